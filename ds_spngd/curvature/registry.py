"""Which Fisher block serves which module, and which parameters are left to the base (momentum-SGD) update."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ds_spngd.curvature.base import CaptureContext, FisherBlock
from ds_spngd.curvature.embedding import EmbeddingBlock, embedding_supported
from ds_spngd.curvature.kronecker import DEFAULT_MAX_FACTOR_DIM, KroneckerBlock
from ds_spngd.curvature.tied import TiedBlock, tied_supported
from ds_spngd.curvature.unit_wise import UnitWiseBlock

__all__ = ["BlockPlan", "build_blocks", "MHA_REASON"]

logger = logging.getLogger("ds_spngd")

MHA_REASON = ("nn.MultiheadAttention calls out_proj functionally (hooks on it never fire) and keeps q/k/v in one "
              "in_proj_weight, so it gets no Fisher block; write attention with nn.Linear q/k/v/out projections and "
              "F.scaled_dot_product_attention (as ds_spngd_lab.models.gpt does) to precondition it")


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


def _shared_params(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """Parameters reached by more than one module: id → [(module name, module), ...]."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append((name, module))
    return {k: v for k, v in owners.items() if len(v) > 1}


def _tie(uses: list[tuple[str, nn.Module]]) -> tuple[tuple[str, nn.Module], tuple[str, nn.Module]] | None:
    """(linear use, embedding use) when the uses are exactly one Embedding and one Linear, else None."""
    if len(uses) != 2:
        return None
    emb = [u for u in uses if isinstance(u[1], nn.Embedding)]
    lin = [u for u in uses if isinstance(u[1], nn.Linear)]
    return (lin[0], emb[0]) if len(emb) == 1 and len(lin) == 1 else None


def build_blocks(model: nn.Module, ctx: CaptureContext, optimized: set[int], skip: Iterable[str] = (),
                 max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM, large_dim_method: str = "block") -> BlockPlan:
    """Create a Fisher block for every supported module whose parameters are all being optimized.

    * nn.Linear, Hugging Face Conv1D, nn.Conv2d: :class:`KroneckerBlock`; nn.Embedding: :class:`EmbeddingBlock`;
      BatchNorm / LayerNorm / RMSNorm: :class:`UnitWiseBlock`.
    * A weight shared by an nn.Embedding and a bias-free nn.Linear (tied input/output embedding) gets one
      :class:`TiedBlock` (named after the Linear). Any other parameter shared between modules leaves those modules
      to the base update (a parameter is never preconditioned twice).
    * nn.MultiheadAttention is refused with the reason (its out_proj is called functionally, so hooks on it never
      fire, and q/k/v live in one in_proj_weight): the module and its children use the base update, and a warning
      names the supported alternative.

    Args:
        model: the raw (unwrapped) model.
        ctx: shared capture context for the blocks' hooks.
        optimized: ``id`` of every parameter handed to the optimizer.
        skip: module names left to the base update (a name covers its children).
        max_factor_dim, large_dim_method: layout of large Kronecker factor sides (see :class:`SymmetricFactor`).

    Returns:
        A :class:`BlockPlan`. Hooks are not registered yet.
    """
    plan = BlockPlan()
    skip = tuple(skip)
    layout = {"max_factor_dim": max_factor_dim, "large_dim_method": large_dim_method}
    shared = _shared_params(model)
    mha = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    tied_done: set[int] = set()
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        label = name or type(module).__name__
        refused = _refusal(name, module, own, skip, mha, optimized)
        if refused is not None:
            plan.fallback.append((label, refused))
            continue
        sharing = [p for p in own if id(p) in shared]
        if sharing:
            _add_tied(plan, label, module, sharing[0], shared[id(sharing[0])], skip, tied_done, ctx, layout)
            continue
        block, reason = _block_for(label, module, ctx, layout)
        if block is not None:
            plan.blocks.append(block)
        else:
            plan.fallback.append((label, f"no Fisher block: {reason}"))
    if mha:
        logger.warning("SP-NGD: %s left to the plain momentum-SGD update: %s", ", ".join(mha), MHA_REASON)
    return plan


def _refusal(name: str, module: nn.Module, own: list[nn.Parameter], skip: tuple[str, ...], mha: list[str],
             optimized: set[int]) -> str | None:
    """Why ``module`` gets no block whatever its kind (skip list, MultiheadAttention, parameters not optimized or
    frozen), or None."""
    if _skipped(name, skip):
        return "listed in skip_modules"
    if name in mha:
        return MHA_REASON
    if _skipped(name, mha):
        return "inside an nn.MultiheadAttention (see its line)"
    if any(id(p) not in optimized for p in own):
        return "some parameters are not given to the optimizer"
    frozen = [n for n, p in module.named_parameters(recurse=False) if not p.requires_grad]
    return f"frozen parameter(s) {frozen}" if frozen else None


def _add_tied(plan: BlockPlan, label: str, module: nn.Module, p: nn.Parameter, uses: list[tuple[str, nn.Module]],
              skip: tuple[str, ...], tied_done: set[int], ctx: CaptureContext, layout: dict[str, Any]) -> None:
    """A module sharing parameter ``p`` (used by ``uses``): one :class:`TiedBlock` for a supported Embedding/Linear
    tie (added once, at its first module), else a fallback line naming the other users."""
    others = [n or type(m).__name__ for n, m in uses if m is not module]
    pair = _tie(uses)
    reason = None if pair is None else tied_supported(pair[1][1], pair[0][1])
    if pair is None or reason is not None or any(_skipped(n, skip) for n, _ in uses):
        why = reason or "only an nn.Embedding tied to a bias-free nn.Linear is supported"
        plan.fallback.append((label, f"shares a parameter with {others}: {why}"))
    elif id(p) not in tied_done:
        tied_done.add(id(p))
        (lin_name, lin), (emb_name, emb) = pair
        plan.blocks.append(TiedBlock(lin_name or "Linear", lin, emb, ctx, emb_name=emb_name or "Embedding",
                                     **layout))


def _block_for(label: str, module: nn.Module, ctx: CaptureContext,
               layout: dict[str, Any]) -> tuple[FisherBlock | None, str]:
    """The Fisher block of an unshared module, or (None, why it has none)."""
    if embedding_supported(module) is None:
        return EmbeddingBlock(label, module, ctx, **layout), ""  # type: ignore[arg-type]
    k_reason, u_reason = KroneckerBlock.unsupported_reason(module), UnitWiseBlock.unsupported_reason(module)
    if k_reason is None:
        return KroneckerBlock(label, module, ctx, **layout), ""
    if u_reason is None:
        return UnitWiseBlock(label, module, ctx), ""
    extra = {n for n, _ in module.named_parameters(recurse=False)} - {"weight", "bias"}
    reason = k_reason if isinstance(module, (nn.Linear, nn.Conv2d)) else u_reason
    if isinstance(module, nn.Embedding):
        reason = embedding_supported(module) or reason
    if extra:
        reason = f"{type(module).__name__} (parameters {sorted(extra)})"
    return None, reason


def describe_blocks(blocks: list[FisherBlock], fallback: list[tuple[str, str]]) -> str:
    """Human-readable list of the preconditioned modules and of those left to the base update (with the reason)."""
    lines = [f"SP-NGD preconditions {len(blocks)} module(s):"]
    lines += [f"  {b.describe()}" for b in blocks]
    if fallback:
        lines.append(f"plain momentum-SGD update for {len(fallback)} module(s):")
        lines += [f"  {n}: {r}" for n, r in fallback]
    return "\n".join(lines)
