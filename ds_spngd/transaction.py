"""Steps 1–3 of an SP-NGD step as one transaction, and how a failed step ends (Osawa et al. arXiv:1811.12019 §4 for
the schedule; the all-ranks-together rule is this project's: a fault on one rank ends the step the same way on every
rank, never a hang).

1. :func:`agree_on_inputs`: the factor reduction completes, one all-reduce agrees on NaN/Inf in gradients and reduced
   factors and on contributions that missed their bucket (:mod:`ds_spngd.comm.agreement`), stale statistics decide
   their next intervals from the same vector, and only then are the factors committed;
2. :func:`refresh_preconditioners`: the owners draft, every rank agrees, the preconditioners are installed where the
   placement wants them (:func:`ds_spngd.comm.inversion.distributed_update`, :mod:`ds_spngd.placement`); with
   ``async_inverse`` the drafting runs on a worker and the agreement and install come ``delay`` steps later
   (:mod:`ds_spngd.comm.async_inversion`);
3. :class:`SkipLedger`: with agreed problems every rank raises the same error or skips the step, with factors,
   preconditioners, momentum and counters exactly as before; it owns the skip counters DeepSpeed reads.

Each function takes the components it coordinates; none reads the optimizer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ds_spngd.comm.agreement import Problem, StepFailure, agree, describe_problems, input_problems
from ds_spngd.comm.async_inversion import AsyncInversion
from ds_spngd.comm.collectives import rank, world_size
from ds_spngd.comm.factor_reduction import FactorReducer
from ds_spngd.comm.inversion import OwnerPlan, distributed_update, global_traces, install_agreed
from ds_spngd.curvature.base import FisherBlock
from ds_spngd.gradients import GradientAccess
from ds_spngd.placement import Placement
from ds_spngd.staleness import RefreshSchedule

__all__ = ["LedgerField", "SkipLedger", "agree_on_inputs", "refresh_preconditioners", "report_silent_hooks"]

logger = logging.getLogger("ds_spngd")


def agree_on_inputs(reducer: FactorReducer, refresh: RefreshSchedule, grads: GradientAccess, group: Any,
                    collect: bool, step: int, factor_decay: float, device: torch.device,
                    stats: dict[str, float | Tensor]) -> None:
    """Complete the factor reduction (``collect``: this is a refresh step), agree on NaN/Inf and contribution
    mismatches, commit the factors (decay ``factor_decay``) of optimizer step ``step``.

    Raises:
        StepFailure: the agreed problems (identical on every rank); nothing was committed.
    """
    factors = reducer.factors if collect else []
    parts = list(reducer.complete()) if collect else []
    if collect:
        rs = reducer.stats
        stats.update(comm_wait_s=rs["wait_s"], comm_launch_s=rs["launch_s"], factor_bytes=rs["payload_bytes"],
                     factor_dense_bytes=rs["dense_bytes"], buckets_early=rs["buckets_early"],
                     buckets=rs["buckets"])
    world = world_size(group)
    changes = refresh.change_terms(reducer.owned_totals(), world, device) if collect else []
    t0 = time.perf_counter()
    sums = agree([*parts, *changes, grads.nonfinite_flags(device)], group, device)
    stats["agree_s"] = time.perf_counter() - t0  # NaN/Inf flags, the one all-reduce and its host sync
    n, m = len(factors), 3 * len(factors) if changes else 0
    had, late, bad, flags = sums[:n], sums[n : 2 * n], sums[2 * n : 3 * n], sums[3 * n + m :]
    problems = input_problems([f.name for f in factors], late, bad, grads.names, flags,
                              reducer.dtype == torch.float16)
    if problems:
        raise StepFailure(problems)
    if collect:
        refresh.decide(sums[3 * n : 3 * n + m], had, step)  # stale_statistics' next intervals
        reducer.commit(had, factor_decay)


def report_silent_hooks(blocks: Sequence[FisherBlock], rank: int) -> bool:
    """After the first committed refresh: rank 0 names the blocks whose hooks never fired (they use the plain
    momentum-SGD update until they do). Returns True (reported)."""
    silent = [b for b in blocks if not b.has_factors]
    if silent and rank == 0:
        logger.warning("SP-NGD: hooks of %d module(s) never fired (%s); they use the plain momentum-SGD update "
                       "until they do", len(silent), ", ".join(b.name for b in silent))
    return True


def refresh_preconditioners(blocks: Sequence[FisherBlock], refresh: RefreshSchedule, plan: OwnerPlan,
                            placement: Placement, damping: float, method: str, group: Any, invert: bool,
                            device: torch.device, stats: dict[str, float | Tensor],
                            inverter: AsyncInversion | None = None, step: int = 0) -> None:
    """Inversion transaction (:func:`ds_spngd.comm.inversion.distributed_update`) on inversion steps (``invert``);
    also (re)builds blocks that have factors but no preconditioner yet (first use, hooks that fired late).

    With an ``inverter`` (``async_inverse``): first the inversion launched ``delay`` steps ago is installed when
    optimizer step ``step`` is its install step (agreement, broadcasts, install); then an inversion step whose blocks
    all have a preconditioner launches its drafting on the worker instead of running it (a block's first inversion
    stays synchronous).

    Raises:
        StepFailure: an owner failed to build a preconditioner (agreed by every rank); nothing was installed.
    """
    t0 = time.perf_counter()
    sent = 0
    share = placement.shares_preconditioners
    if inverter is not None and inverter.due(step):
        pending = inverter.take()
        assert pending.result is not None
        sent, problems = install_agreed(blocks, pending.todo, plan, *pending.result, damping, method, group, share,
                                        device)
        if problems:
            raise StepFailure(problems)
        refresh.inverted(pending.todo, pending.versions)
        stats["async_installed"] = 1.0
    todo = [b.has_factors and (inv or not b.has_preconditioner)
            for b, inv in zip(blocks, refresh.to_invert(invert), strict=True)]
    if any(todo):
        first = any(t and not b.has_preconditioner for b, t in zip(blocks, todo, strict=True))
        if inverter is not None and not first:
            traces = global_traces(blocks, todo, plan, group, device)
            inverter.launch(step, blocks, todo, plan, traces, damping, method, device, rank(group),
                            world_size(group), refresh.versions(todo))
            stats["async_launched"] = 1.0
        else:
            sent_now, problems = distributed_update(blocks, todo, plan, damping, method, group, share, device)
            if problems:
                raise StepFailure(problems)
            refresh.inverted(todo)
            sent += sent_now
    if sent or any(todo) or "async_installed" in stats:
        stats["inverse_bytes"] = float(sent)
        stats["inversion_s"] = time.perf_counter() - t0


class SkipLedger:
    """How failed steps end, and the counters DeepSpeed reads (``overflow``: the step was skipped).

    Args:
        nonfinite: ``"raise"`` or ``"skip"`` (the config key).
        max_consecutive_skips: skips in a row after which the next failing step raises.

    Attributes:
        overflow: True after a skipped step (set before DeepSpeed's engine reads it).
        skipped_steps: steps skipped so far; consecutive_skips: since the last applied step; last_skip_reason.
    """

    def __init__(self, nonfinite: str, max_consecutive_skips: int) -> None:
        self.nonfinite = nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.overflow = False
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.last_skip_reason = ""

    def applied(self) -> None:
        """A step was applied: the run of skips ends."""
        self.consecutive_skips = 0

    def fail(self, problems: list[Problem], step: int) -> str:
        """End a step whose problems every rank agreed on: raise the same error everywhere, or return the reason to
        skip it with (count it through :meth:`note`).

        Raises:
            RuntimeError: a problem that is not numerical (contributions after their bucket left).
            FloatingPointError: ``nonfinite: "raise"``, or too many skips in a row.
        """
        message = describe_problems(step + self.skipped_steps, problems)
        if any(not p.numerical for p in problems):
            raise RuntimeError(f"{message}. No parameter was updated.")
        if self.nonfinite == "raise":
            raise FloatingPointError(f"{message}. No parameter was updated; factors and preconditioners are "
                                     'unchanged (set "nonfinite": "skip" to skip such steps instead).')
        return message

    def note(self, reason: str, rank: int) -> None:
        """Count a skipped step (SP-NGD's own, or one DeepSpeed skipped for NaN/Inf gradients outside fp16); sets
        ``overflow`` so DeepSpeed's engine counts it as skipped and holds the LR scheduler.

        Raises:
            FloatingPointError: ``max_consecutive_skips`` steps in a row were skipped already (this one would be one
                more); nothing is counted then.
        """
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise FloatingPointError(
                f"SP-NGD: a step fails after {self.consecutive_skips} consecutive steps (max_consecutive_skips="
                f"{self.max_consecutive_skips}) were skipped; the run is not recovering. This one: {reason}")
        self.overflow = True
        self.skipped_steps += 1
        self.consecutive_skips += 1
        self.last_skip_reason = reason
        if rank == 0:
            logger.warning("SP-NGD skipped a step (%d in a row, %d in all): %s", self.consecutive_skips,
                           self.skipped_steps, reason)


class LedgerField:
    """A descriptor that exposes one :class:`SkipLedger` attribute on its owner (``owner.ledger.<name>``), so engines
    keep reading ``optimizer.overflow`` / ``skipped_steps`` while the ledger owns them."""

    def __init__(self, name: str, doc: str, writable: bool = False) -> None:
        self.name, self.writable, self.__doc__ = name, writable, doc

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self if obj is None else getattr(obj.ledger, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        if not self.writable:
            raise AttributeError(f"{self.name} is read-only (counted by the optimizer's SkipLedger)")
        setattr(obj.ledger, self.name, value)
