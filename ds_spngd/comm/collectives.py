"""Thin collectives over deepspeed.comm (or torch.distributed when DeepSpeed's comm backend is not initialized, e.g.
in a plain torch.distributed program). Every function is a no-op on one rank and takes *group* ranks, translating
them to the global ranks the backends expect.

Asynchronous calls return a handle with ``wait()`` (``None`` when nothing was launched); :func:`wait_all` waits on
a list of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.distributed as dist
from torch import Tensor

__all__ = ["world_size", "rank", "backend", "broadcast", "all_reduce_sum", "reduce_sum", "wait_all"]


def _ds_comm() -> Any | None:
    try:
        import deepspeed.comm as dscomm
    except ImportError:  # pragma: no cover - deepspeed is a hard dependency, but keep the math importable alone
        return None
    return dscomm if dscomm.is_initialized() else None


def _api() -> Any:
    ds = _ds_comm()
    return ds if ds is not None else dist


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


def backend(group: Any = None) -> str:
    """The process group's backend name ("gloo", "nccl", ...; "none" without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return "none"
    return str(dist.get_backend(group))


def _global(group_rank: int, group: Any) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def broadcast(t: Tensor, src: int, group: Any = None, async_op: bool = False) -> Any:
    """In-place broadcast of ``t`` from group rank ``src``. Returns the handle when ``async_op`` (else None)."""
    if world_size(group) == 1:
        return None
    handle = _api().broadcast(t, src=_global(src, group), group=group, async_op=async_op)
    return handle if async_op else None


def all_reduce_sum(t: Tensor, group: Any = None, async_op: bool = False) -> Any:
    """In-place SUM all-reduce of ``t`` over ``group``. Returns the handle when ``async_op`` (else ``t``)."""
    if world_size(group) == 1:
        return None if async_op else t
    api = _api()
    handle = api.all_reduce(t, op=api.ReduceOp.SUM, group=group, async_op=async_op)
    return handle if async_op else t


def reduce_sum(t: Tensor, dst: int, group: Any = None, async_op: bool = False) -> Any:
    """SUM reduce of ``t`` to group rank ``dst`` (only ``dst``'s ``t`` holds the result afterwards)."""
    if world_size(group) == 1:
        return None
    api = _api()
    handle = api.reduce(t, dst=_global(dst, group), op=api.ReduceOp.SUM, group=group, async_op=async_op)
    return handle if async_op else None


def wait_all(handles: Iterable[Any]) -> None:
    """Wait on every handle (``None`` entries are skipped)."""
    for h in handles:
        if h is not None:
            h.wait()
