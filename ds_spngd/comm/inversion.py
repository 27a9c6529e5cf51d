"""Inversions spread over ranks (SP-NGD, Osawa et al. arXiv:1811.12019 §4; KAISA, Pauloski et al. arXiv:2107.01739):
every block is inverted by one owner rank chosen by the LPT cost model (:mod:`ds_spngd.comm.assignment`); the owner
is also the rank its factors were reduced to.

An inversion step is a small transaction, so that a failure on one owner ends the step the same way on every rank:

1. every owner *drafts* its blocks' preconditioners (Cholesky started without a host sync; one sync per rank
   checks all factorizations and re-does failures by eigendecomposition);
2. every rank agrees (:func:`ds_spngd.comm.agreement.agree`, one small all-reduce) that no owner failed — a solver
   exception or a non-finite result becomes a failure code naming the block;
3. only then are the preconditioners installed, each from one flat fp32 buffer per owner, on every rank in the same
   way (owner included: same bits, same memory layout, hence bitwise-identical preconditioning everywhere).

Two placements of the result (the ``precondition_mode`` knob):

* ``comm_opt``: the owners' buffers are broadcast on inversion steps; every rank then preconditions every block
  locally, so steps between inversions send nothing extra.
* ``mem_opt``: owners keep their preconditioners; every step each owner preconditions its blocks' gradients and
  broadcasts the results (:func:`share_directions`), so every inverse is held by one rank only (SP-NGD's scheme).

What is inverted and by whom is decided from state identical on every rank (factor versions, the step counter,
shapes and the world size), so the sequence of collectives is identical on every rank by construction. Buffers are
allocated on ``device``, the device of the gradients (NCCL takes CUDA tensors only).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ds_spngd.comm.agreement import INVERSION_FAILURES, Problem, agree
from ds_spngd.comm.assignment import Assignment, assign_owners, block_cost
from ds_spngd.comm.collectives import broadcast, rank, world_size
from ds_spngd.curvature.base import FisherBlock, PreconditionerDraft
from ds_spngd.linalg import finish_inverses

__all__ = ["plan_owners", "distributed_update", "share_directions"]

logger = logging.getLogger("ds_spngd")


def plan_owners(blocks: Sequence[FisherBlock], group: Any = None) -> Assignment:
    """LPT assignment of the blocks' inversions (cost d³ per factor) over the group's ranks."""
    costs = [block_cost([(f.blocks, f.dim) for f in b.factors]) for b in blocks]
    return assign_owners(costs, world_size(group))


def _split(flat: Tensor, shapes: Sequence[Sequence[int]]) -> list[Tensor]:
    """Contiguous copies of consecutive pieces of ``flat`` (every rank gets identical tensors from identical bits)."""
    out, offset = [], 0
    for s in shapes:
        n = int(torch.Size(s).numel())
        out.append(flat[offset : offset + n].reshape(tuple(s)).clone())
        offset += n
    return out


def _draft_all(blocks: Sequence[FisherBlock], ids: Sequence[int], damping: float, method: str,
               device: torch.device) -> tuple[dict[int, list[Tensor]], Tensor]:
    """Owner side: the new preconditioners of blocks ``ids`` and a failure code per block (0 = fine)."""
    codes = torch.zeros(len(blocks), device=device)
    drafts: dict[int, PreconditionerDraft] = {}
    for i in ids:
        try:
            drafts[i] = blocks[i].draft_preconditioner(damping, method)
        except torch.linalg.LinAlgError as err:
            logger.error("SP-NGD: inverting %s failed: %s", blocks[i].name, err)
            codes[i] = 1.0
        except Exception:  # noqa: BLE001 - any error here must reach every rank through the agreement, not hang it
            logger.exception("SP-NGD: drafting the preconditioner of %s failed", blocks[i].name)
            codes[i] = 3.0
    finish_inverses([j for d in drafts.values() for j in d.jobs])
    for i, d in list(drafts.items()):
        errors = [j.error for j in d.jobs if j.error is not None]
        if errors:  # the eigendecomposition fallback of one of its factors did not converge
            logger.error("SP-NGD: inverting %s failed: %s", blocks[i].name, errors[0])
            codes[i] = 1.0
            del drafts[i]
    built = {i: d.build() for i, d in drafts.items()}
    if built:
        ids_built = list(built)
        norms = torch._foreach_norm([t for i in ids_built for t in built[i]], float("inf"))
        per_block, k = [], 0
        for i in ids_built:
            n = len(built[i])
            per_block.append(torch.stack(norms[k : k + n]).sum())
            k += n
        bad = ~torch.isfinite(torch.stack(per_block))
        codes[ids_built] = torch.where(bad, torch.full_like(codes[ids_built], 2.0), codes[ids_built])
    return built, codes


def distributed_update(blocks: Sequence[FisherBlock], todo: Sequence[bool], assignment: Assignment, damping: float,
                       method: str, group: Any, share: bool, device: torch.device) -> tuple[int, list[Problem]]:
    """Recompute the preconditioners of the blocks flagged in ``todo``, each on its owner (see the module docstring).

    Args:
        blocks: all blocks, in the order shared by every rank.
        todo: which blocks to refresh (must be identical on every rank).
        assignment: owners from :func:`plan_owners`.
        damping: λ.
        method: ``"inverse"`` or ``"eigen"``.
        group: SP-NGD's process group.
        share: broadcast the new preconditioners to every rank (``comm_opt``); False keeps them on the owner.
        device: device of the communication buffers (the gradients').

    Returns:
        (bytes this rank handed to broadcasts, the agreed problems). With problems nothing was installed anywhere:
        every block keeps its previous preconditioner on every rank.
    """
    me, world = rank(group), world_size(group)
    owners = assignment.owners
    mine = [i for i, t in enumerate(todo) if t and (world == 1 or owners[i] == me)]
    built, codes = _draft_all(blocks, mine, damping, method, device)
    agreed = agree([codes], group, device)
    problems = [Problem(blocks[i].name, f"inverting on rank {owners[i]} failed: {INVERSION_FAILURES[int(c)]}")
                for i, c in enumerate(agreed) if c != 0.0]
    if problems:
        return 0, problems
    sent = 0
    for owner in range(world):
        ids = [i for i, t in enumerate(todo) if t and owners[i] == owner]
        if not ids or not (share or owner == me or world == 1):
            continue
        shapes = [s for i in ids for s in blocks[i].preconditioner_shapes(method)]
        numel = sum(int(torch.Size(s).numel()) for s in shapes)
        if owner == me or world == 1:
            flat = torch.cat([t.reshape(-1).float() for i in ids for t in built[i]])
        else:
            flat = torch.empty(numel, dtype=torch.float32, device=device)
        if share and world > 1:
            broadcast(flat, owner, group)
            sent += numel * 4
        tensors = _split(flat, shapes)
        for i in ids:
            k = len(blocks[i].preconditioner_shapes(method))
            blocks[i].install_preconditioner(tensors[:k], method)
            tensors = tensors[k:]
    for i, t in enumerate(todo):
        if t:
            blocks[i].precond_ready = True
    return sent, []


def share_directions(directions: dict[int, list[Tensor]], shapes: dict[int, list[tuple[int, ...]]],
                     owners: Sequence[int], partial: Tensor, group: Any,
                     device: torch.device) -> tuple[dict[int, list[Tensor]], Tensor, int]:
    """``mem_opt``: every owner broadcasts its blocks' preconditioned gradients (one fp32 buffer per owner).

    Every rank, the owner included, takes the directions from the broadcast buffer, so all ranks update from the
    same bits in the same layout.

    Args:
        directions: block index → F̂⁻¹g tensors, for the blocks this rank owns.
        shapes: block index → the shapes of its tensors, for every block to share (identical on all ranks).
        owners: owner group rank per block index.
        partial: this rank's partial sum Σ F̂⁻¹g·g over its blocks (KL-clip), a 0-d tensor; travels in the owner's
            buffer.
        group: SP-NGD's process group.
        device: device of the buffers.

    Returns:
        (directions of every block in ``shapes``, Σ of every owner's partial as a 0-d fp32 tensor, bytes broadcast).
    """
    me, world = rank(group), world_size(group)
    if world == 1:
        return directions, partial.float(), 0
    out: dict[int, list[Tensor]] = {}
    total = torch.zeros((), dtype=torch.float32, device=device)
    sent = 0
    for owner in range(world):
        ids = [i for i in sorted(shapes) if owners[i] == owner]
        flat_shapes = [s for i in ids for s in shapes[i]]
        numel = sum(int(torch.Size(s).numel()) for s in flat_shapes) + 1
        if owner == me:
            flat = torch.cat([t.reshape(-1).float() for i in ids for t in directions[i]]
                             + [partial.reshape(1).to(device=device, dtype=torch.float32)])
        else:
            flat = torch.empty(numel, dtype=torch.float32, device=device)
        broadcast(flat, owner, group)
        sent += numel * 4
        total = total + flat[-1]
        tensors = _split(flat[:-1], flat_shapes)
        for i in ids:
            k = len(shapes[i])
            out[i], tensors = tensors[:k], tensors[k:]
    return out, total, sent
