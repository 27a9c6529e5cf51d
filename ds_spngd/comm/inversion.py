"""Inversions spread over ranks (SP-NGD, Osawa et al. arXiv:1811.12019 §4; KAISA, Pauloski et al. arXiv:2107.01739):
every block is inverted by one owner rank chosen by the LPT cost model (:mod:`ds_spngd.comm.assignment`); the owner
is also the rank its factors were reduced to.

Two placements of the result (the ``precondition_mode`` knob):

* ``comm_opt``: each owner broadcasts its blocks' preconditioners (one flat fp32 buffer per owner) on inversion
  steps; every rank then preconditions every block locally, so steps between inversions send nothing extra.
* ``mem_opt``: owners keep their preconditioners; every step each owner preconditions its blocks' gradients and
  broadcasts the results (:func:`share_directions`), so every inverse is held by one rank only (SP-NGD's scheme).

What is inverted and by whom is decided from state identical on every rank (factor versions, the step counter,
shapes and the world size), so the sequence of collectives is identical on every rank by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ds_spngd.comm.assignment import Assignment, assign_owners, block_cost
from ds_spngd.comm.collectives import broadcast, rank, world_size
from ds_spngd.curvature.base import FisherBlock

__all__ = ["plan_owners", "distributed_update", "share_directions"]


def plan_owners(blocks: Sequence[FisherBlock], group: Any = None) -> Assignment:
    """LPT assignment of the blocks' inversions (cost d³ per factor) over the group's ranks."""
    costs = [block_cost([(f.blocks, f.dim) for f in b.factors]) for b in blocks]
    return assign_owners(costs, world_size(group))


def _split(flat: Tensor, shapes: Sequence[Sequence[int]]) -> list[Tensor]:
    out, offset = [], 0
    for s in shapes:
        n = int(torch.Size(s).numel())
        out.append(flat[offset : offset + n].reshape(tuple(s)).clone())
        offset += n
    return out


def distributed_update(blocks: Sequence[FisherBlock], todo: Sequence[bool], assignment: Assignment, damping: float,
                       method: str, group: Any = None, share: bool = True) -> int:
    """Recompute the preconditioners of the blocks flagged in ``todo``, each on its owner.

    Args:
        blocks: all blocks, in the order shared by every rank.
        todo: which blocks to refresh (must be identical on every rank).
        assignment: owners from :func:`plan_owners`.
        damping: λ.
        method: ``"inverse"`` or ``"eigen"``.
        group: data-parallel process group.
        share: broadcast the new preconditioners to every rank (``comm_opt``); False keeps them on the owner.

    Returns:
        Bytes this rank handed to broadcasts (sent as owner or received).
    """
    me, world = rank(group), world_size(group)
    for i, b in enumerate(blocks):
        if todo[i]:
            if world == 1 or assignment.owners[i] == me:
                b.update_preconditioner(damping, method)
            b.precond_ready = True
    if world == 1 or not share:
        return 0
    sent = 0
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
        sent += numel * 4
        if owner == me:
            continue
        tensors = _split(flat, shapes)
        for b in mine:
            k = len(b.preconditioner_shapes(method))
            b.load_preconditioner(tensors[:k], method)
            tensors = tensors[k:]
    return sent


def share_directions(directions: dict[int, list[Tensor]], shapes: dict[int, list[tuple[int, ...]]],
                     owners: Sequence[int], partial: float, group: Any = None) -> tuple[dict[int, list[Tensor]], float,
                                                                                        int]:
    """``mem_opt``: every owner broadcasts its blocks' preconditioned gradients (one fp32 buffer per owner).

    Args:
        directions: block index → F̂⁻¹g tensors, for the blocks this rank owns.
        shapes: block index → the shapes of its tensors, for every block to share (identical on all ranks).
        owners: owner group rank per block index.
        partial: this rank's partial sum Σ F̂⁻¹g·g over its blocks (KL-clip); travels in the owner's buffer.
        group: data-parallel process group.

    Returns:
        (directions of every block in ``shapes``, Σ of every owner's partial, bytes broadcast).
    """
    me, world = rank(group), world_size(group)
    if world == 1:
        return directions, partial, 0
    out = dict(directions)
    total, sent = 0.0, 0
    for owner in range(world):
        ids = [i for i in sorted(shapes) if owners[i] == owner]
        numel = sum(int(torch.Size(s).numel()) for i in ids for s in shapes[i]) + 1
        if owner == me:
            flat = torch.cat([t.reshape(-1).float() for i in ids for t in directions[i]]
                             + [torch.tensor([partial], dtype=torch.float32)])
        else:
            flat = torch.empty(numel, dtype=torch.float32)
        broadcast(flat, owner, group)
        sent += numel * 4
        total += float(flat[-1])
        if owner == me:
            continue
        tensors = _split(flat[:-1], [s for i in ids for s in shapes[i]])
        for i in ids:
            k = len(shapes[i])
            out[i], tensors = tensors[:k], tensors[k:]
    return out, total, sent
