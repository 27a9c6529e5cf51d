"""Run logging for the reference training scripts (train.py, train_lm.py): start-up and teardown of the ranks, a
per-step CSV and the final result table / JSON (rank 0 only), the Weights & Biases run that DeepSpeed's ``wandb``
monitor opened (config, summary, explicit finish), and removal of the ``/dev/shm`` buffers DeepSpeed's CPU
communication op leaves behind for a master port."""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import deepspeed
import torch
import torch.distributed as dist

STEP_COLUMNS = ("step", "samples", "loss", "lr", "wall_time_s")
SHM_PATTERN = "/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"


def start_ranks() -> tuple[int, int]:
    """Join DeepSpeed's process group and return (rank, world size). On CPU every rank gets its share of the cores
    (DeepSpeed's launcher gives each CPU rank all of them, which oversubscribes the machine)."""
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world)))
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    return rank, world


def read_ds_config(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """(path, parsed JSON) of ``args.deepspeed_config``; clears it on ``args``, because the scripts pass the resolved
    dict to DeepSpeed, which refuses a path and a dict together.

    Raises:
        OSError, json.JSONDecodeError: the file cannot be read or is not JSON.
    """
    path = Path(args.deepspeed_config)
    raw = json.loads(path.read_text(encoding="utf-8"))
    args.deepspeed_config = None
    return path, raw


def finish_ranks() -> None:
    """Tear the process group down explicitly: left to interpreter exit, gloo ranks sometimes abort ("terminate
    called without an active exception") after all work is done, failing the launcher."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class StepLog:
    """Append-only CSV of optimizer steps with columns :data:`STEP_COLUMNS`; a no-op unless ``enabled``.

    Args:
        path: CSV file to create (parent folders are created; an existing file is overwritten).
        enabled: write only when true (pass ``rank == 0``).
    """

    def __init__(self, path: Path | str, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._file: IO[str] | None = None
        self._writer: Any = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", newline="", encoding="utf-8")
            self._writer = csv.writer(self._file)
            self._writer.writerow(STEP_COLUMNS)
            self._file.flush()

    def write(self, step: int, samples: int, loss: float, lr: float, wall_time_s: float) -> None:
        """Append one row: 1-based optimizer ``step``, cumulative ``samples``, mean ``loss``, ``lr`` used by the step,
        cumulative training ``wall_time_s`` (seconds, evaluation excluded). Flushed immediately.

        Raises:
            ValueError: if the log was closed.
        """
        if not self.enabled:
            return
        if self._file is None or self._file.closed:
            raise ValueError(f"step log {self.path} is closed")
        self._writer.writerow([step, samples, f"{loss:.6g}", f"{lr:.6g}", f"{wall_time_s:.4f}"])
        self._file.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> StepLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class RunResult:
    """Outcome of one training run.

    Attributes:
        epochs: epochs trained (``steps / steps_per_epoch``, may be fractional).
        steps: optimizer steps taken.
        wall_time_s: training wall time in seconds, evaluation excluded.
        test_top1: final test top-1 accuracy in ``[0, 1]``.
        final_loss: mean training loss of the last step (all ranks and micro-batches).
        target_acc: the ``--target-acc`` threshold, or ``None``.
        steps_to_target: first evaluated step with ``test_top1 >= target_acc``, or ``None`` (not reached).
        time_to_target_s: training wall time (s) at that step, or ``None``.
        epochs_to_target: epochs at that step, or ``None``.
        evals: every evaluation as ``(step, training wall time s, test top-1)``, in order.
    """

    epochs: float
    steps: int
    wall_time_s: float
    test_top1: float
    final_loss: float
    target_acc: float | None = None
    steps_to_target: int | None = None
    time_to_target_s: float | None = None
    epochs_to_target: float | None = None
    evals: tuple[tuple[int, float, float], ...] = ()

    def to_json_dict(self) -> dict[str, Any]:
        """Plain dict for ``result.json`` (non-finite floats become ``None`` so the JSON stays standard)."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            out[key] = None if isinstance(value, float) and not math.isfinite(value) else value
        out["evals"] = [list(e) for e in self.evals]
        return out


def _fmt_target(result: RunResult) -> tuple[str, str]:
    if result.target_acc is None:
        return "target", "-"
    label = f"to {100 * result.target_acc:.2f}% top-1"
    if result.steps_to_target is None or result.time_to_target_s is None:
        return label, "not reached"
    epochs = "" if result.epochs_to_target is None else f", {result.epochs_to_target:.2f} epochs"
    return label, f"{result.steps_to_target} steps, {result.time_to_target_s:.1f} s{epochs}"


def format_table(result: RunResult, extra: dict[str, str] | None = None) -> str:
    """Aligned two-column text table of ``result`` (plus ``extra`` rows first, e.g. model / optimizer / batch)."""
    rows: list[tuple[str, str]] = list((extra or {}).items())
    per_epoch = result.wall_time_s / result.epochs if result.epochs > 0 else float("nan")
    rows += [
        ("epochs", f"{result.epochs:.2f}"),
        ("steps", str(result.steps)),
        ("train wall time", f"{result.wall_time_s:.1f} s (eval excluded)"),
        ("wall time / epoch", f"{per_epoch:.1f} s"),
        ("final train loss", f"{result.final_loss:.4f}"),
        ("test top-1", f"{100 * result.test_top1:.2f}%"),
        _fmt_target(result),
    ]
    return render_table(rows)


def render_table(rows: list[tuple[str, str]]) -> str:
    """``rows`` as an aligned two-column text table between ``+---+`` rules."""
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    rule = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
    lines = [rule] + [f"| {k.ljust(width)} | {v.ljust(vwidth)} |" for k, v in rows] + [rule]
    return "\n".join(lines)


def write_result(path: Path | str, result: RunResult, extra: dict[str, Any] | None = None) -> None:
    """Write ``result`` (and ``extra`` keys, e.g. run settings) as indented JSON to ``path``, creating folders."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {**(extra or {}), **result.to_json_dict()}
    out.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def agreed_step_loss(loss_sum: torch.Tensor, micro_batches: int, world: int, step: int, raise_nonfinite: bool,
                     where: str = "") -> float:
    """The optimizer step's mean training loss over every rank's micro-batches, agreed before the boundary step.

    Called after the last micro-batch's backward, before ``engine.step()``: the one all-reduce is reached by every
    rank, so a non-finite loss on any rank stops all of them at the same point.

    Args:
        loss_sum: this rank's sum of micro-batch losses (a 1-element fp64 CPU tensor; summed over ranks in place).
        micro_batches: gradient_accumulation_steps.
        world: data-parallel world size.
        step: optimizer steps done so far (the message names step + 1).
        raise_nonfinite: raise on a non-finite loss (False when SP-NGD skips such steps itself, ``nonfinite: "skip"``).
        where: extra context for the message, e.g. ``" (epoch 3)"``.

    Raises:
        FloatingPointError: the mean loss is NaN/Inf and ``raise_nonfinite`` (on every rank).
    """
    if world > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
    value = float(loss_sum) / (micro_batches * world)
    if raise_nonfinite and not math.isfinite(value):
        raise FloatingPointError(
            f"non-finite training loss {value} at optimizer step {step + 1}{where}; stopped before applying the "
            'update (SP-NGD with "nonfinite": "skip" skips such steps)')
    return value


def shm_buffers(port: int) -> list[str]:
    """Paths of the shared-memory buffers DeepSpeed's CPU comm op made for MASTER_PORT ``port``.

    DeepSpeed 0.19.8 builds that op whenever its accelerator is the CPU and never unlinks its files
    (``/dev/shm/deepspeed_allreduce_buffer_<job>_<addr>_<port>_<rank>``, 69 MB per rank, RAM-backed), whether the
    run ended normally or was killed. The port is matched as a whole ``_<port>_`` field, so port 2950 never matches
    29500's buffers.
    """
    return sorted(glob.glob(SHM_PATTERN.format(port=int(port))))


def remove_shm_buffers(port: int) -> int:
    """Delete the :func:`shm_buffers` of MASTER_PORT ``port`` (only that port's); returns how many were removed.

    Call it once the ranks of that port are gone (their launcher exited or was killed): anything that launches ranks
    (tests, benchmarks, the sweep) owns the buffers of its own port and nothing else.
    """
    removed = 0
    for path in shm_buffers(port):
        try:
            os.unlink(path)
            removed += 1
        except OSError:  # already gone (another cleanup, or a rank still exiting)
            pass
    return removed


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
