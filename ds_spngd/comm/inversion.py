"""Inversions spread over ranks (SP-NGD, Osawa et al. arXiv:1811.12019 §4; KAISA's communication-optimal mode,
Pauloski et al. arXiv:2107.01739): every block is inverted by one owner rank chosen by the LPT cost model
(:mod:`ds_spngd.comm.assignment`), and each owner broadcasts its blocks' preconditioners in one flat fp32 buffer.

Every rank holds every preconditioner afterwards and preconditions its gradients locally, so the per-step cost between
inversions is unchanged. Which blocks are inverted is decided from state identical on all ranks (committed factors,
the step counter), so the sequence of broadcasts is identical on every rank by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ds_spngd.comm.assignment import Assignment, assign_owners, block_cost
from ds_spngd.comm.collectives import broadcast, rank, world_size
from ds_spngd.curvature.base import FisherBlock

__all__ = ["plan_owners", "distributed_update"]


def plan_owners(blocks: Sequence[FisherBlock], group: Any = None) -> Assignment:
    """LPT assignment of the blocks' inversions (cost d³ per factor) over the group's ranks."""
    costs = [block_cost([(f.blocks, f.dim) for f in b.factors]) for b in blocks]
    return assign_owners(costs, world_size(group))


def distributed_update(blocks: Sequence[FisherBlock], todo: Sequence[bool], assignment: Assignment, damping: float,
                       method: str, group: Any = None) -> None:
    """Recompute the preconditioners of the blocks flagged in ``todo``, each on its owner, and share them.

    Args:
        blocks: all blocks, in the order shared by every rank.
        todo: which blocks to refresh (must be identical on every rank).
        assignment: owners from :func:`plan_owners`.
        damping: λ.
        method: ``"inverse"`` or ``"eigen"``.
        group: data-parallel process group.
    """
    me, world = rank(group), world_size(group)
    for i, b in enumerate(blocks):
        if todo[i] and (world == 1 or assignment.owners[i] == me):
            b.update_preconditioner(damping, method)
    if world == 1:
        return
    for owner in range(world):
        mine = [b for i, b in enumerate(blocks) if todo[i] and assignment.owners[i] == owner]
        if not mine:
            continue
        shapes = [s for b in mine for s in b.preconditioner_shapes(method)]
        numel = sum(int(torch.Size(s).numel()) for s in shapes)
        if owner == me:
            flat = torch.cat([t.reshape(-1) for b in mine for t in b.preconditioner_tensors()])
        else:
            flat = torch.empty(numel, dtype=torch.float32)
        broadcast(flat, owner, group)
        if owner == me:
            continue
        offset = 0
        for b in mine:
            tensors = []
            for s in b.preconditioner_shapes(method):
                n = int(torch.Size(s).numel())
                tensors.append(flat[offset : offset + n].reshape(s).clone())
                offset += n
            b.load_preconditioner(tensors, method)
