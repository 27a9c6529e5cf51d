"""Stale statistics: a refresh interval per curvature factor, agreed by every rank (``stale_statistics`` in the JSON).

Source: Osawa et al., "Scalable and Practical Natural Gradient for Large-Scale Deep Learning", TPAMI 2020,
arXiv:2002.06015 (SP-NGD's "stale statistics"): every statistic (A_l, G_l, unit-wise blocks) has its own refresh
interval; on a refresh the new value is compared with the one in use, the interval grows while the statistic barely
changes and is reset when it moves, and a statistic that is not refreshed skips its computation, its communication
and the inversion that depends on it.

The rule implemented here (:func:`next_interval`) keeps that scheme but uses a simple, documented growth law rather
than the paper's: intervals are counted in *refresh slots* (the steps t with t mod ``factor_update_steps`` = 0) and

    c = ‖F_new − F_old‖_F / ‖F_old‖_F        (F = the factor's running average, before / after this refresh)
    interval ← min(2·interval, stale_max_interval)   if c < stale_tolerance,
    interval ← 1                                      otherwise (and on a factor's first estimate).

Deviations from the source, stated: (1) the growth is doubling, not the additive +1 / log-based bound of the
chainerkfac reference code (interval = min(max_skip, log_err(tol) + 1, previous + 1), err = min(s/r, r/s) on a scalar
statistic); (2) the comparison is the relative Frobenius change of the matrix factor; (3) the exact rule of the
paper's body was not verified (see /work/shared/SPNGD_NOTES.md, "Stale statistics").

Agreement (every rank must reduce the same factors, or the collectives would not match): the reduced factor sum T
(Σ over ranks of their local means) lives on the factor's owner only, and the number n of contributing ranks is only
known after the step's agreement. So the owner writes three numbers per refreshed factor into the step's one status
vector (:func:`ds_spngd.comm.agreement.agree`; every other rank writes zeros), centred on the usual n = k (the world
size) so that no cancellation happens in fp32: a = ‖D‖², b = ⟨D, F_old⟩, v = ‖F_old‖² with D = T − k·F_old. After
the SUM all-reduce every rank holds the same sums and the same n, and computes, with the same host arithmetic,

    ‖F_new − F_old‖² = (1 − decay)² · (a + 2(k − n)·b + (k − n)²·v) / n²   (F_new = decay·F_old + (1−decay)·T/n)

hence the same interval and the same due set for every later step: no extra collective, no host decision from
unreduced local data. The sums travel in fp32 (relative precision ~1e-7 of each; when n < k the terms partly
cancel, resolving c to about 1e-3). Decisions are applied only when the step completes (a skipped or failed step
leaves every interval as it was).

Inversions: on an inversion step a block is re-inverted only when one of its factors was committed since its last
inversion (factor versions, identical on every rank); the others keep their preconditioner.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ds_spngd.curvature.base import FisherBlock

__all__ = ["next_interval", "relative_change", "RefreshSchedule"]


def next_interval(change: float | None, interval: int, tolerance: float, cap: int) -> int:
    """The interval (in refresh slots, ≥ 1) after a refresh whose relative change was ``change`` (module docstring).

    Args:
        change: ‖F_new − F_old‖_F / ‖F_old‖_F, or None when there was no previous value (first estimate).
        interval: the interval in use (slots).
        tolerance: τ; ``change < τ`` doubles the interval (τ = 0 never does).
        cap: the largest interval (slots, ≥ 1).
    """
    if change is None or not math.isfinite(change) or change >= tolerance:
        return 1
    return max(1, min(2 * interval, cap))


def relative_change(a: float, b: float, v: float, n: float, k: float, decay: float) -> float | None:
    """c = ‖F_new − F_old‖_F / ‖F_old‖_F from the reduced sums a = ‖T − k·F_old‖², b = ⟨T − k·F_old, F_old⟩,
    v = ‖F_old‖² (T: Σ of the n contributing ranks' means, k: the world size; module docstring); None when F_old is
    zero or no rank contributed."""
    if n <= 0 or v <= 0.0 or not all(map(math.isfinite, (a, b, v))):
        return None
    sq = (a + 2.0 * (k - n) * b + (k - n) ** 2 * v) / (n * n)
    return (1.0 - decay) * math.sqrt(max(sq, 0.0) / v)


class RefreshSchedule:
    """Per-factor refresh intervals and the due set of each step (identical on every rank).

    Args:
        blocks: the optimizer's Fisher blocks (their factors, in this order, are the schedule's factors).
        factor_update_steps: the base refresh period (steps per slot).
        enabled: ``stale_statistics``; False = every factor is due on every slot (the fixed schedule).
        tolerance: ``stale_tolerance``.
        cap: ``stale_max_interval`` (slots).
        decay: ``factor_decay`` (the change is that of the running average).

    Attributes:
        interval: per factor, its interval in slots.
        next_due: per factor, the first slot (step // factor_update_steps) on which it is due again.
        due: per factor, whether it is due on the step planned last (:meth:`plan`).
    """

    def __init__(self, blocks: Sequence[FisherBlock], factor_update_steps: int, enabled: bool = False,
                 tolerance: float = 0.0, cap: int = 1, decay: float = 0.0) -> None:
        self.blocks = list(blocks)
        self.factors = [f for b in self.blocks for f in b.factors]
        self.period, self.enabled, self.tolerance, self.cap, self.decay = (factor_update_steps, enabled, tolerance,
                                                                           cap, decay)
        n = len(self.factors)
        self.interval = [1] * n
        self.next_due = [0] * n
        self.due = [True] * n
        self._refreshing = True
        self._world = 1  # the k of the last change_terms
        self._pending: list[tuple[int, int, int]] | None = None  # (factor index, interval, next_due)
        self._inverted: dict[str, tuple[int, ...]] = {}  # block name → factor versions at its last inversion

    # ---- the due set --------------------------------------------------------------------------------------------
    def plan(self, step: int) -> bool:
        """Set :attr:`due` and every factor's ``due`` flag for optimizer step ``step``; True when it refreshes any
        factor (then the hooks collect). Without ``stale_statistics``: every factor, on every slot."""
        slot = step // self.period
        on_slot = step % self.period == 0
        self.due = [on_slot and (not self.enabled or slot >= nd) for nd in self.next_due]
        for f, d in zip(self.factors, self.due, strict=True):
            f.due = d or not on_slot  # off-slot steps do not collect anyway (ctx.collecting is False)
        self._refreshing = any(self.due)
        return self._refreshing

    def due_mask(self) -> list[bool] | None:
        """The reducer's mask for the planned step (None = every factor)."""
        return None if not self.enabled or all(self.due) else list(self.due)

    def refresh_fraction(self) -> float:
        """Due factors / all factors on the planned step (0 when it refreshes nothing)."""
        return sum(self.due) / len(self.due) if self.due and self._refreshing else 0.0

    def block_fractions(self) -> dict[str, float]:
        """Per block, the fraction of its factors refreshed on the planned step (``refresh_fraction/<block>``)."""
        out, i = {}, 0
        for b in self.blocks:
            k = len(b.factors)
            out[f"refresh_fraction/{b.name}"] = sum(self.due[i : i + k]) / k if k else 0.0
            i += k
        return out

    def intervals(self) -> dict[str, int]:
        """Factor name → its current interval in refresh slots."""
        return {f.name: k for f, k in zip(self.factors, self.interval, strict=True)}

    # ---- deciding (inside the step's agreement) ------------------------------------------------------------------
    def change_terms(self, totals: Mapping[str, Tensor], world: int, device: torch.device) -> list[Tensor]:
        """This rank's part of the agreement vector: 3 values per factor — ‖D‖², ⟨D, F_old⟩, ‖F_old‖² with
        D = T − world·F_old for the due factors this rank owns that have a previous value, zeros elsewhere (empty
        when disabled)."""
        if not self.enabled:
            return []
        self._world = world
        out = torch.zeros(len(self.factors), 3, dtype=torch.float64, device=device)
        for i, f in enumerate(self.factors):
            t, v = totals.get(f.name), f.value
            if self.due[i] and t is not None and v is not None:
                t64, v64 = t.to(device=device, dtype=torch.float64), v.to(device=device, dtype=torch.float64)
                d64 = t64 - world * v64
                out[i] = torch.stack([(d64 * d64).sum(), (d64 * v64).sum(), (v64 * v64).sum()])
        return [out.reshape(-1)]

    def decide(self, sums: Sequence[float], contributors: Sequence[float], step: int) -> None:
        """From the reduced :meth:`change_terms` and the contributing ranks per factor (identical on every rank),
        compute each refreshed factor's next interval; kept pending until :meth:`apply`."""
        if not self.enabled:
            return
        slot = step // self.period
        pending = []
        for i, f in enumerate(self.factors):
            if not self.due[i] or contributors[i] <= 0:
                continue  # not refreshed (or nothing arrived: it stays due)
            a, b, v = sums[3 * i : 3 * i + 3]
            change = relative_change(a, b, v, contributors[i], self._world, self.decay) if f.committed else None
            k = next_interval(change, self.interval[i], self.tolerance, self.cap)
            pending.append((i, k, slot + k))
        self._pending = pending

    def apply(self) -> None:
        """Make the step's decisions final (the step completed on every rank)."""
        for i, k, nd in self._pending or []:
            self.interval[i], self.next_due[i] = k, nd
        self._pending = None

    def discard(self) -> None:
        """Forget the step's decisions (the step was skipped or failed on every rank)."""
        self._pending = None

    # ---- inversions ---------------------------------------------------------------------------------------------
    def to_invert(self, invert: bool) -> list[bool]:
        """Per block, whether an inversion step re-inverts it: every block without ``stale_statistics``, else the
        blocks with a factor committed since their last inversion."""
        if not invert:
            return [False] * len(self.blocks)
        if not self.enabled:
            return [True] * len(self.blocks)
        return [self._inverted.get(b.name) != self._versions(b) for b in self.blocks]

    def inverted(self, done: Sequence[bool], versions: dict[str, tuple[int, ...]] | None = None) -> None:
        """Record the factor versions of the blocks just (re)inverted (``versions``: those the inversion was
        computed from, when it was launched earlier — asynchronous inverses; default: the current ones)."""
        for b, d in zip(self.blocks, done, strict=True):
            if d:
                self._inverted[b.name] = versions[b.name] if versions is not None else self._versions(b)

    def versions(self, done: Sequence[bool]) -> dict[str, tuple[int, ...]]:
        """The current factor versions of the blocks flagged in ``done``, by block name."""
        return {b.name: self._versions(b) for b, d in zip(self.blocks, done, strict=True) if d}

    @staticmethod
    def _versions(b: FisherBlock) -> tuple[int, ...]:
        return tuple(f.version for f in b.factors)

    # ---- checkpoint ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Intervals, next due slots and the versions of the last inversions, by name (identical on every rank)."""
        return {"interval": self.intervals(),
                "next_due": {f.name: k for f, k in zip(self.factors, self.next_due, strict=True)},
                "inverted": {k: list(v) for k, v in self._inverted.items()}}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restore :meth:`state_dict` (None, or factors missing from it: interval 1, due at once; blocks without a
        recorded inversion are re-inverted on the next inversion step)."""
        state = state or {}
        interval, next_due = state.get("interval", {}), state.get("next_due", {})
        self.interval = [int(interval.get(f.name, 1)) for f in self.factors]
        self.next_due = [int(next_due.get(f.name, 0)) for f in self.factors]
        self._inverted = {k: tuple(int(x) for x in v) for k, v in state.get("inverted", {}).items()}
        self._pending = None
