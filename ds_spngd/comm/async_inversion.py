"""Asynchronous inverses (Ba, Grosse & Martens, "Distributed Second-Order Optimization using Kronecker-Factored
Approximations", ICLR 2017, §3–4): the inverse work of an inversion step runs off the critical path and the new
preconditioners are installed ``delay`` steps later, at a step every rank knows in advance.

What moves off the critical path is each owner's *local* work on its parts — the damped Cholesky inverses or
eigendecompositions and their assembly (:func:`ds_spngd.comm.inversion.draft_local`) — on a worker thread (CPU; torch
releases the GIL inside its kernels) or, on CUDA, on a side stream driven by that thread. Every collective stays on
the main thread at a fixed place of a fixed step:

* launch step t (an inversion step whose blocks all have a preconditioner already): the traces all-reduce
  (:func:`ds_spngd.comm.inversion.global_traces`), then the worker starts on a snapshot of the owned factors as
  committed at step t (:func:`ds_spngd.curvature.factor.frozen_values`: the worker reads them, the main thread keeps
  committing new statistics);
* install step t + ``delay`` (``1 ≤ delay ≤ inv_update_steps``, so at most one inversion is in flight): the main
  thread waits for the worker, then the agreement on the owners' failure codes, the broadcasts and the install run
  exactly as in the synchronous transaction (:func:`ds_spngd.comm.inversion.install_agreed`) — a failure ends that
  step the same way on every rank (raise or skip), as before.

Steps t … t + delay − 1 precondition with the previous preconditioners: staleness bounded by ``delay`` steps beyond
the synchronous schedule's. The result is the synchronous computation of the same factor snapshot, bit for bit, so
a run is deterministic and ranks stay bitwise identical. The first inversion of a block (no preconditioner yet) is
synchronous. A checkpoint keeps a pending inversion's finished tensors (the worker is joined when the shard is
written) and its install step, so a resumed run installs the same preconditioners at the same step (same world size;
otherwise the pending inversion is dropped with a warning and the saved preconditioners stay until the next one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ds_spngd.comm.inversion import OwnerPlan, draft_local
from ds_spngd.curvature.base import FisherBlock, Traces
from ds_spngd.curvature.factor import frozen_values

__all__ = ["AsyncInversion", "PendingInversion"]


@dataclass
class PendingInversion:
    """An inversion launched at one step and installed at ``install_step``.

    Attributes:
        install_step: the optimizer step (``SPNGD.steps``) whose transaction installs it.
        todo: per block, whether this inversion refreshes it (identical on every rank).
        versions: the inverted blocks' factor versions at launch (the stale-statistics bookkeeping records them).
        future: the worker's (built tensors per job, failure code per job, CUDA event or None); None once loaded from
            a checkpoint with ``result`` set.
        result: the finished (built, codes) — set by :meth:`AsyncInversion.join`.
    """

    install_step: int
    todo: list[bool]
    versions: dict[str, tuple[int, ...]] = field(default_factory=dict)
    future: Future[tuple[dict[int, list[Tensor]], Tensor, Any]] | None = None
    result: tuple[dict[int, list[Tensor]], Tensor] | None = field(default=None)


class AsyncInversion:
    """The worker and the one pending inversion of an optimizer (module docstring).

    Args:
        delay: steps between launch and install (≥ 1).
    """

    def __init__(self, delay: int) -> None:
        if delay < 1:
            raise ValueError(f"async inversion delay must be >= 1, got {delay}")
        self.delay = delay
        self.pending: PendingInversion | None = None
        self._pool: ThreadPoolExecutor | None = None

    def launch(self, step: int, blocks: Sequence[FisherBlock], todo: Sequence[bool], plan: OwnerPlan, traces: Traces,
               damping: float, method: str, device: torch.device, me: int, world: int,
               versions: dict[str, tuple[int, ...]] | None = None) -> None:
        """Start the owners' local inversion work for ``todo`` on the worker, on the factors as committed now.

        Raises:
            RuntimeError: an inversion is still pending (the schedule allows one at a time).
        """
        if self.pending is not None:
            raise RuntimeError(f"SP-NGD: an asynchronous inversion is still pending (install at step "
                               f"{self.pending.install_step}) at step {step}")
        snapshot = {id(f): f.value for b, t in zip(blocks, todo, strict=True) if t for f in b.factors}
        stream = None
        if device.type == "cuda":  # the side stream starts after everything queued so far (the committed factors)
            stream = torch.cuda.Stream(device=device)
            stream.wait_stream(torch.cuda.current_stream(device))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spngd-inverse")
        job = (blocks, list(todo), plan, traces, damping, method, device, me, world)
        future = self._pool.submit(_work, snapshot, stream, job)
        self.pending = PendingInversion(step + self.delay, list(todo), dict(versions or {}), future)

    def due(self, step: int) -> bool:
        """True when the pending inversion is to be installed at (or before) ``step``."""
        return self.pending is not None and step >= self.pending.install_step

    def join(self) -> PendingInversion | None:
        """Wait for the worker (no install): the pending inversion with its ``result`` set, or None."""
        p = self.pending
        if p is None or p.result is not None:
            return p
        assert p.future is not None
        built, codes, event = p.future.result()
        if event is not None:  # later work on the current stream reads the worker's tensors
            torch.cuda.current_stream(codes.device).wait_event(event)
        p.result, p.future = (built, codes), None
        return p

    def take(self) -> PendingInversion:
        """The pending inversion, finished, and no pending one left (its install step has come)."""
        p = self.join()
        assert p is not None and p.result is not None
        self.pending = None
        return p

    def state(self) -> dict[str, Any] | None:
        """What a checkpoint keeps of the pending inversion (the worker is joined): install step, todo, this rank's
        finished tensors and failure codes; None when nothing is pending."""
        p = self.join()
        if p is None or p.result is None:
            return None
        built, codes = p.result
        return {"install_step": p.install_step, "todo": list(p.todo), "versions": dict(p.versions),
                "built": {j: [t.clone() for t in ts] for j, ts in built.items()}, "codes": codes.clone()}

    def load(self, state: dict[str, Any] | None, device: torch.device) -> None:
        """Restore :meth:`state` (tensors moved to ``device``); None drops any pending inversion."""
        self.pending = None
        if state is None:
            return
        built = {int(j): [t.to(device) for t in ts] for j, ts in state["built"].items()}
        versions = {str(k): tuple(int(x) for x in v) for k, v in state.get("versions", {}).items()}
        self.pending = PendingInversion(int(state["install_step"]), [bool(t) for t in state["todo"]], versions,
                                        result=(built, state["codes"].to(device)))

    def close(self) -> None:
        """Wait for the worker and stop it."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _work(snapshot: dict[int, Tensor | None], stream: Any,
          job: tuple[Any, ...]) -> tuple[dict[int, list[Tensor]], Tensor, Any]:
    """The worker: :func:`ds_spngd.comm.inversion.draft_local` on the frozen factors (on ``stream`` on CUDA)."""
    blocks, todo, plan, traces, damping, method, device, me, world = job
    ctx: contextlib.AbstractContextManager[Any] = (torch.cuda.stream(stream) if stream is not None
                                                   else contextlib.nullcontext())
    with frozen_values(snapshot), ctx, torch.no_grad():
        built, codes = draft_local(blocks, todo, plan, traces, damping, method, device, me, world)
        event = None
        if stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
    return built, codes, event
