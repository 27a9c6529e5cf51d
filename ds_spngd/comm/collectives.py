"""Thin collectives over torch.distributed, on SP-NGD's own process group.

Every function is a no-op on one rank and takes *group* ranks, translating them to the global ranks the backends
expect. Asynchronous calls return a handle with ``wait()`` (``None`` when nothing was launched); :func:`wait_all`
waits on a list of them.

SP-NGD runs its collectives on a private copy of the data-parallel group (:func:`private_group`): factor buckets are
launched from module hooks as soon as they are final, and while every rank launches them in the same plan order, the
moment of the launch relative to DeepSpeed's own collectives (ZeRO-2's gradient reductions, also launched from hooks)
depends on local readiness. On one shared communicator that interleaving would have to be identical on every rank
(NCCL and gloo match collectives by issue order); on a private communicator only SP-NGD's own order matters, and
that is fixed by construction.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.distributed as dist
from torch import Tensor

__all__ = ["world_size", "rank", "backend", "broadcast", "all_reduce_sum", "reduce_sum", "all_gather_flat", "wait_all",
           "private_group", "group_ranks"]

# (default process group, global ranks of a group) → its SP-NGD copy; keyed by the default group so that a process
# that destroys and re-initializes torch.distributed never reuses a communicator of the old one
_PRIVATE: dict[tuple[int, tuple[int, ...], str], tuple[Any, Any]] = {}


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group: Any = None) -> int:
    """Data-parallel world size (1 when no process group is initialized)."""
    if not _initialized():
        return 1
    return dist.get_world_size(group)


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (0 when no process group is initialized)."""
    if not _initialized():
        return 0
    return dist.get_rank(group)


def backend(group: Any = None) -> str:
    """The process group's backend name ("gloo", "nccl", "cuda:gloo", ...; "none" without a process group)."""
    if not _initialized():
        return "none"
    return str(dist.get_backend(group))


def group_ranks(group: Any = None) -> list[int]:
    """Global ranks of ``group`` in group-rank order (``[0]`` without a process group)."""
    if not _initialized():
        return [0]
    if group is None:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(group))


def private_group(group: Any = None, purpose: str = "spngd") -> Any:
    """SP-NGD's own communicator over the same ranks as ``group`` (None = world); see the module docstring.

    A collective call: every process of the world must call it, in the same order (``ds_spngd.initialize`` does,
    on every rank). When the data-parallel groups are strict subgroups (model parallelism), every process creates
    every data-parallel group's copy, as ``torch.distributed.new_group`` requires, and keeps its own. Copies are
    cached per rank set and ``purpose``, so calling it again creates nothing; another ``purpose`` (e.g.
    ``"gradients"``, :mod:`ds_spngd.comm.grad_reduction`) gives another communicator over the same ranks.

    Returns:
        The private group (the input ``group`` itself on one rank or without torch.distributed).
    """
    if world_size(group) == 1:
        return group
    default = dist.group.WORLD
    mine = tuple(group_ranks(group))
    key = (id(default), mine, purpose)
    if key in _PRIVATE:
        return _PRIVATE[key][1]
    if len(mine) == dist.get_world_size():
        all_sets = [mine]
    else:  # every process must create every group, in the same order
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, list(mine))
        all_sets = sorted({tuple(g) for g in gathered})
    for ranks in all_sets:
        if (id(default), ranks, purpose) not in _PRIVATE:  # the default group is kept with it: its id is never reused
            _PRIVATE[(id(default), ranks, purpose)] = (default, dist.new_group(list(ranks)))
    return _PRIVATE[key][1]


def _global(group_rank: int, group: Any) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def broadcast(t: Tensor, src: int, group: Any = None, async_op: bool = False) -> Any:
    """In-place broadcast of ``t`` from group rank ``src``. Returns the handle when ``async_op`` (else None)."""
    if world_size(group) == 1:
        return None
    handle = dist.broadcast(t, src=_global(src, group), group=group, async_op=async_op)
    return handle if async_op else None


def all_reduce_sum(t: Tensor, group: Any = None, async_op: bool = False) -> Any:
    """In-place SUM all-reduce of ``t`` over ``group``. Returns the handle when ``async_op`` (else ``t``)."""
    if world_size(group) == 1:
        return None if async_op else t
    handle = dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group, async_op=async_op)
    return handle if async_op else t


def reduce_sum(t: Tensor, dst: int, group: Any = None, async_op: bool = False) -> Any:
    """SUM reduce of ``t`` to group rank ``dst`` (only ``dst``'s ``t`` holds the result afterwards)."""
    if world_size(group) == 1:
        return None
    handle = dist.reduce(t, dst=_global(dst, group), op=dist.ReduceOp.SUM, group=group, async_op=async_op)
    return handle if async_op else None


def all_gather_flat(out: Tensor, t: Tensor, group: Any = None) -> Tensor:
    """Every rank's ``t`` (the same length on every rank) concatenated in group-rank order into ``out`` (returned);
    on one rank a copy of ``t``."""
    if world_size(group) == 1:
        return out.copy_(t)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # its older name
    gather(out, t, group=group)
    return out


def wait_all(handles: Iterable[Any]) -> None:
    """Wait on every handle (``None`` entries are skipped)."""
    for h in handles:
        if h is not None:
            h.wait()
