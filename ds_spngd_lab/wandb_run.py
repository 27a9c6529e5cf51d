"""The Weights & Biases run that DeepSpeed's ``wandb`` monitor section opened on rank 0: found without importing
wandb (:func:`active_wandb_run`; the scripts write their settings into its config) and finished explicitly with the
result as its summary (:func:`finish_wandb`)."""

from __future__ import annotations

import sys
from typing import Any


def active_wandb_run() -> Any:
    """The Weights & Biases run of this process, or None.

    DeepSpeed's ``wandb`` monitor calls ``wandb.init(project, group, entity)`` on rank 0 and nothing else. ``wandb``
    is looked up in ``sys.modules`` only: a run without the monitor never imports it.
    """
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


def finish_wandb(summary: dict[str, Any] | None = None) -> bool:
    """Write ``summary`` into the active W&B run's summary and finish it; False when there is no run.

    DeepSpeed 0.19.8's monitor never calls ``wandb.finish()``: the run would otherwise rely on wandb's ``atexit``
    hook, which a gloo rank that aborts at interpreter exit may never reach. Finishing here, before the process group
    is torn down, and waiting for wandb's service (``wandb.teardown()``: ``finish()`` alone returned before the run's
    file was written in 2 of 6 tries here) flushes an offline run (``WANDB_MODE=offline``) to its ``offline-run-*``
    folder for ``wandb sync``.
    """
    run = active_wandb_run()
    if run is None:
        return False
    if summary:
        run.summary.update({k: v for k, v in summary.items() if v is not None})
    run.finish()
    teardown = getattr(sys.modules["wandb"], "teardown", None)
    if teardown is not None:  # finish() can return before wandb's service has written the run: wait for it
        teardown()
    return True
