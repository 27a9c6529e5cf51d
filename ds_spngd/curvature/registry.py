"""Which Fisher block serves which module, and which parameters are left to the base (momentum-SGD) update."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from ds_spngd.curvature.base import CaptureContext, FisherBlock
from ds_spngd.curvature.kronecker import KroneckerBlock
from ds_spngd.curvature.unit_wise import UnitWiseBlock

__all__ = ["BlockPlan", "build_blocks"]


@dataclass
class BlockPlan:
    """Result of :func:`build_blocks`.

    Attributes:
        blocks: preconditioned modules, in ``model.named_modules()`` order (identical on every rank).
        fallback: (module name, reason) for every module with trainable parameters left to the base update.
    """

    blocks: list[FisherBlock] = field(default_factory=list)
    fallback: list[tuple[str, str]] = field(default_factory=list)


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def build_blocks(model: nn.Module, ctx: CaptureContext, optimized: set[int], skip: Iterable[str] = ()) -> BlockPlan:
    """Create a Fisher block for every supported module whose parameters are all being optimized.

    Args:
        model: the raw (unwrapped) model.
        ctx: shared capture context for the blocks' hooks.
        optimized: ``id`` of every parameter handed to the optimizer.
        skip: module names left to the base update (a name covers its children).

    Returns:
        A :class:`BlockPlan`. Hooks are not registered yet.
    """
    plan = BlockPlan()
    skip = tuple(skip)
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        label = name or type(module).__name__
        if _skipped(name, skip):
            plan.fallback.append((label, "listed in skip_modules"))
            continue
        if any(id(p) not in optimized for p in own):
            plan.fallback.append((label, "some parameters are not given to the optimizer"))
            continue
        frozen = [n for n, p in module.named_parameters(recurse=False) if not p.requires_grad]
        if frozen:
            plan.fallback.append((label, f"frozen parameter(s) {frozen}"))
            continue
        k_reason, u_reason = KroneckerBlock.unsupported_reason(module), UnitWiseBlock.unsupported_reason(module)
        if k_reason is None:
            plan.blocks.append(KroneckerBlock(label, module, ctx))
        elif u_reason is None:
            plan.blocks.append(UnitWiseBlock(label, module, ctx))
        else:
            extra = {n for n, _ in module.named_parameters(recurse=False)} - {"weight", "bias"}
            reason = k_reason if isinstance(module, (nn.Linear, nn.Conv2d)) else u_reason
            if extra:
                reason = f"{type(module).__name__} (parameters {sorted(extra)})"
            plan.fallback.append((label, f"no Fisher block: {reason}"))
    return plan
