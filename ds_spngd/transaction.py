"""Steps 1–3 of an SP-NGD step as one transaction, and how a failed step ends (Osawa et al. arXiv:1811.12019 §4 for
the schedule; the all-ranks-together rule is this project's: a fault on one rank ends the step the same way on every
rank, never a hang).

1. :func:`agree_on_inputs`: the factor reduction completes, one all-reduce agrees on NaN/Inf in gradients and reduced
   factors and on contributions that missed their bucket (:mod:`ds_spngd.comm.agreement`), stale statistics decide
   their next intervals from the same vector, and only then are the factors committed;
2. :func:`refresh_preconditioners`: the owners draft, every rank agrees, the preconditioners are installed
   (:func:`ds_spngd.comm.inversion.distributed_update`);
3. :func:`fail`: with agreed problems every rank raises the same error or skips the step (:func:`note_skipped`), with
   factors, preconditioners, momentum and counters exactly as before.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ds_spngd.comm.agreement import Problem, StepFailure, agree, describe_problems, input_problems
from ds_spngd.comm.collectives import world_size
from ds_spngd.comm.inversion import distributed_update

if TYPE_CHECKING:
    from ds_spngd.optimizer import SPNGD

__all__ = ["agree_on_inputs", "refresh_preconditioners", "fail", "note_skipped"]

logger = logging.getLogger("ds_spngd")


def agree_on_inputs(opt: SPNGD, refresh: bool, device: torch.device, stats: dict[str, float | Tensor]) -> None:
    """Complete the factor reduction, agree on NaN/Inf and contribution mismatches, commit the factors.

    Raises:
        StepFailure: the agreed problems (identical on every rank); nothing was committed.
    """
    assert opt.reducer is not None
    factors = opt.reducer.factors if refresh else []
    parts = list(opt.reducer.complete()) if refresh else []
    if refresh:
        rs = opt.reducer.stats
        stats.update(comm_wait_s=rs["wait_s"], comm_launch_s=rs["launch_s"], factor_bytes=rs["payload_bytes"],
                     factor_dense_bytes=rs["dense_bytes"], buckets_early=rs["buckets_early"],
                     buckets=rs["buckets"])
    world = world_size(opt.group)
    changes = opt.refresh.change_terms(opt.reducer.owned_totals(), world, device) if refresh else []
    sums = agree([*parts, *changes, opt.grads.nonfinite_flags(device)], opt.group, device)
    n, m = len(factors), 3 * len(factors) if changes else 0
    had, late, bad, grads = sums[:n], sums[n : 2 * n], sums[2 * n : 3 * n], sums[3 * n + m :]
    problems = input_problems([f.name for f in factors], late, bad, opt.grads.names, grads,
                              opt.reducer.dtype == torch.float16)
    if problems:
        raise StepFailure(problems)
    if refresh:
        opt.refresh.decide(sums[3 * n : 3 * n + m], had, opt.steps)  # stale_statistics' next intervals
        opt.reducer.commit(had, opt.cfg.factor_decay)
        _report_silent(opt)

def _report_silent(opt: SPNGD) -> None:
    if opt._reported_silent:
        return
    opt._reported_silent = True
    silent = [b for b in opt.blocks if not b.has_factors]
    if silent and opt.rank == 0:
        logger.warning("SP-NGD: hooks of %d module(s) never fired (%s); they use the plain momentum-SGD update "
                       "until they do", len(silent), ", ".join(b.name for b in silent))

def refresh_preconditioners(opt: SPNGD, invert: bool, device: torch.device, stats: dict[str, float | Tensor]) -> None:
    """Inversion transaction (:func:`ds_spngd.comm.inversion.distributed_update`); also (re)builds blocks that
    have factors but no preconditioner yet (first use, hooks that fired late).

    Raises:
        StepFailure: an owner failed to build a preconditioner (agreed by every rank); nothing was installed.
    """
    assert opt._owners is not None
    todo = [b.has_factors and (inv or not b.has_preconditioner)
            for b, inv in zip(opt.blocks, opt.refresh.to_invert(invert), strict=True)]
    if not any(todo):
        return
    t0 = time.perf_counter()
    sent, problems = distributed_update(opt.blocks, todo, opt._owners, opt.cfg.damping, opt.cfg.inverse_method,
                                        opt.group, opt.cfg.precondition_mode == "comm_opt", device)
    if problems:
        raise StepFailure(problems)
    opt.refresh.inverted(todo)
    stats["inverse_bytes"] = float(sent)
    stats["inversion_s"] = time.perf_counter() - t0


def fail(opt: SPNGD, problems: list[Problem], loss: float | None) -> float | None:
    """End a step whose problems every rank agreed on: raise the same error everywhere, or skip it."""
    opt.ctx.factor_seconds = 0.0
    message = describe_problems(opt.steps + opt.skipped_steps, problems)
    if any(not p.numerical for p in problems):
        raise RuntimeError(f"{message}. No parameter was updated.")
    if opt.cfg.nonfinite == "raise":
        raise FloatingPointError(f"{message}. No parameter was updated; factors and preconditioners are "
                                 'unchanged (set "nonfinite": "skip" to skip such steps instead).')
    note_skipped(opt, message)
    return loss


def note_skipped(opt: SPNGD, reason: str) -> None:
    """Count a skipped step (this optimizer's own, or one DeepSpeed skipped for NaN/Inf gradients outside fp16).

    Sets ``overflow`` so DeepSpeed's engine counts it as skipped and holds the LR scheduler.

    Raises:
        FloatingPointError: ``max_consecutive_skips`` steps in a row were skipped already (this one would be one
            more); nothing is counted then.
    """
    if opt.consecutive_skips >= opt.cfg.max_consecutive_skips:
        raise FloatingPointError(
            f"SP-NGD: a step fails after {opt.consecutive_skips} consecutive steps (max_consecutive_skips="
            f"{opt.cfg.max_consecutive_skips}) were skipped; the run is not recovering. This one: {reason}")
    opt.overflow = True
    opt.skipped_steps += 1
    opt.consecutive_skips += 1
    opt.last_skip_reason = reason
    opt._stats = {"skipped": 1.0}
    if opt.rank == 0:
        logger.warning("SP-NGD skipped a step (%d in a row, %d in all): %s", opt.consecutive_skips,
                       opt.skipped_steps, reason)
