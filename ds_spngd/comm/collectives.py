"""Factor reduction across data-parallel ranks over deepspeed.comm (or torch.distributed when DeepSpeed's comm
backend is not initialized, e.g. in a plain torch.distributed program).

Each rank contributes, per factor, its local sum Σ x xᵀ and the number of examples behind it; the reduced sum divided
by the reduced count is the per-example average over the *global* batch, whatever the world size, micro-batch size or
gradient accumulation (so 2 ranks × half the batch give exactly the factors of 1 rank × the whole batch).

The symmetric sums travel packed as upper triangles (:mod:`ds_spngd.comm.packing`) in one flat fp32 buffer with the
counts appended, i.e. a single collective per factor-refresh step; collective order is fixed by the factor order,
which is identical on every rank by construction (same model, same module traversal).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ds_spngd.comm.packing import pack_symmetric, unpack_symmetric
from ds_spngd.curvature.factor import SymmetricFactor

__all__ = ["world_size", "rank", "all_reduce_sum", "broadcast", "reduce_factors", "factor_traffic_bytes"]


def _ds_comm() -> Any | None:
    try:
        import deepspeed.comm as dscomm
    except ImportError:  # pragma: no cover - deepspeed is a hard dependency, but keep the math importable alone
        return None
    return dscomm if dscomm.is_initialized() else None


def world_size(group: Any = None) -> int:
    """Data-parallel world size (1 when no process group is initialized)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (0 when no process group is initialized)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def broadcast(t: Tensor, src: int, group: Any = None) -> Tensor:
    """In-place broadcast of ``t`` from group rank ``src`` (a no-op on one rank); returns ``t``."""
    if world_size(group) == 1:
        return t
    src_global = src if group is None else dist.get_global_rank(group, src)
    ds = _ds_comm()
    if ds is not None:
        ds.broadcast(t, src=src_global, group=group)
    else:
        dist.broadcast(t, src=src_global, group=group)
    return t


def all_reduce_sum(t: Tensor, group: Any = None) -> Tensor:
    """In-place SUM all-reduce of ``t`` over ``group`` (a no-op on one rank); returns ``t``."""
    if world_size(group) == 1:
        return t
    ds = _ds_comm()
    if ds is not None:
        ds.all_reduce(t, op=ds.ReduceOp.SUM, group=group)
    else:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def factor_traffic_bytes(factors: Sequence[SymmetricFactor], dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """(packed bytes, dense bytes) one refresh sends per rank: packed upper triangles vs full d×d matrices."""
    size = torch.empty(0, dtype=dtype).element_size()
    packed = sum(f.packed_numel for f in factors) * size
    dense = sum(f.blocks * f.dim * f.dim for f in factors) * 4
    return packed, dense


def reduce_factors(factors: Sequence[SymmetricFactor], decay: float, group: Any = None) -> list[bool]:
    """Reduce every factor's local sum and count over the group and commit the global estimate.

    Args:
        factors: in a fixed order identical on all ranks.
        decay: running-average decay passed to :meth:`SymmetricFactor.commit`.
        group: data-parallel process group (None = world).

    Returns:
        For each factor, whether it received any example on any rank (and was committed).

    Raises:
        FloatingPointError: naming the first factor whose reduced estimate is NaN/Inf.
    """
    if not factors:
        return []
    local = [f.take_local() for f in factors]
    flat = pack_symmetric([s for s, _ in local], dtype=torch.float32)
    counts = torch.tensor([c for _, c in local], dtype=torch.float32, device=flat.device)
    buf = all_reduce_sum(torch.cat([flat, counts]), group)
    totals = unpack_symmetric(buf[: flat.numel()], [(f.blocks, f.dim) for f in factors])
    reduced_counts = buf[flat.numel() :].tolist()
    return [f.commit(t, c, decay) for f, t, c in zip(factors, totals, reduced_counts, strict=True)]
