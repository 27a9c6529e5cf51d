"""Faults and canaries planted into a run: :attr:`Case.inject` on one rank, and the default-device slip of
:attr:`Case.canary`.

Every hook here is the test's own: an instance attribute shadowing a block's ``draft_part``, a tensor hook, a scaled
batch, or a patched :meth:`SymmetricFactor.take_local` restored on exit. The owners are read from SP-NGD's public
``owner_plan``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ds_spngd import SPNGD
from ds_spngd.curvature.base import PreconditionerDraft, Traces
from ds_spngd.curvature.factor import Count, SymmetricFactor
from tests.support.worker.case import Case

FACTOR_SCALE = 1e19  # "factor": the faulty rank's micro-batch × this overflows its factor statistics


def owned_blocks(spngd: SPNGD, rank: int) -> set[int]:
    """Indices of the blocks with at least one part (inversion job) owned by ``rank``."""
    plan = spngd.owner_plan
    assert plan is not None, "SP-NGD has no owner plan yet"
    return {i for j, (i, _) in enumerate(plan.jobs) if plan.owners[j] == rank}


def _broken_draft(real: Callable[..., PreconditionerDraft], kind: str) -> Callable[..., PreconditionerDraft]:
    """A ``draft_part`` that raises a LinAlgError ("inversion") or whose draft builds NaN ("inversion_nan")."""

    def broken(k: int, damping: float, method: str, traces: Traces) -> PreconditionerDraft:
        if kind == "inversion":
            raise torch.linalg.LinAlgError("injected: the solver did not converge")
        draft = real(k, damping, method, traces)
        build = draft.build
        draft.build = lambda: [t * float("nan") for t in build()]
        return draft

    return broken


def arm_inversion_fault(spngd: SPNGD, case: Case, rank: int, step: int) -> None:
    """"inversion" / "inversion_nan": before each step, restore every block's ``draft_part``; on the injected rank
    and steps, make the drafts of the blocks it owns fail (raise, or return NaN)."""
    inject = case.inject
    if inject is None or not inject.kind.startswith("inversion"):
        return
    active = inject.active(rank, step)
    owned = owned_blocks(spngd, rank) if active else set()
    for i, block in enumerate(spngd.blocks):
        if (i in owned) == ("draft_part" in block.__dict__):
            continue  # unchanged: no window in which an asynchronous-inversion worker could see the other one
        block.__dict__.pop("draft_part", None)  # back to the class method
        if i in owned:
            block.draft_part = _broken_draft(block.draft_part, inject.kind)  # type: ignore[method-assign]


def scale_for(case: Case, rank: int, step: int) -> float:
    """The factor of this rank's share of the batch: :data:`FACTOR_SCALE` while a "factor" fault is active."""
    return FACTOR_SCALE if case.fault(rank, step, "factor") else 1.0


def arm_grad_fault(model: nn.Module, case: Case, rank: int, step: int) -> list[RemovableHandle]:
    """"grad": while active, the first parameter's gradient × Inf before DeepSpeed's reduction; the handles to remove
    after the step."""
    if not case.fault(rank, step, "grad"):
        return []
    p = next(iter(model.parameters()))
    return [p.register_hook(lambda g: g * float("inf"))]


@contextmanager
def device_slip() -> Iterator[None]:
    """The canary of the default-device probe: the bug it exists for (a silent module's zero contribution created
    without naming a device, so it lands on the default device), planted into :meth:`SymmetricFactor.take_local`
    while the context is open."""
    original = SymmetricFactor.take_local

    def take_local(self: SymmetricFactor) -> tuple[torch.Tensor, Count]:
        if self.accum is None:
            self.accum = torch.zeros(self.blocks, self.dim, self.dim)  # no device: the slip
        return original(self)

    SymmetricFactor.take_local = take_local  # type: ignore[method-assign]
    try:
        yield
    finally:
        SymmetricFactor.take_local = original  # type: ignore[method-assign]
