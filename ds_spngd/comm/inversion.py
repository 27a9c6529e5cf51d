"""Inversions spread over ranks (SP-NGD, Osawa et al. arXiv:1811.12019 §4; KAISA, Pauloski et al. arXiv:2107.01739):
every *part* of a block (the whole block, or one diagonal block of a side beyond ``max_factor_dim``,
:mod:`ds_spngd.curvature.side`) is inverted by one owner rank chosen by the LPT cost model
(:mod:`ds_spngd.comm.assignment`); the owner is also the rank the part's factors were reduced to. The owner of a
block's first part is the *block owner*: it preconditions the block in ``mem_opt``. When a block's parts have
several owners, π-corrected damping needs the traces of whole sides: every rank first all-reduces the traces of those
blocks' factors (one small collective, only on inversion steps that refresh such a block).

An inversion step is a small transaction, so that a failure on one owner ends the step the same way on every rank:

1. every owner *drafts* its parts' preconditioners (Cholesky started without a host sync; one sync per rank
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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ds_spngd.comm.agreement import INVERSION_FAILURES, Problem, agree, max_abs
from ds_spngd.comm.assignment import Assignment, assign_owners, block_cost
from ds_spngd.comm.collectives import all_reduce_sum, broadcast, rank, world_size
from ds_spngd.curvature.base import FisherBlock, PreconditionerDraft, Traces
from ds_spngd.linalg import finish_inverses

__all__ = ["OwnerPlan", "plan_owners", "plan_parts", "distributed_update", "draft_local", "global_traces",
           "install_agreed", "share_directions"]

logger = logging.getLogger("ds_spngd")


@dataclass(frozen=True)
class OwnerPlan:
    """Who owns which part of which block (identical on every rank: shapes and world size only).

    Attributes:
        jobs: (block index, part index) of every part, blocks in order.
        assignment: the LPT result over ``jobs`` (``assignment.owners[j]`` owns job j).
        block_owners: per block, the owner of its first part (preconditions the block in ``mem_opt``).
    """

    jobs: tuple[tuple[int, int], ...]
    assignment: Assignment
    block_owners: tuple[int, ...]

    @property
    def owners(self) -> tuple[int, ...]:
        """Owner of each job."""
        return self.assignment.owners

    def factor_owners(self, blocks: Sequence[FisherBlock]) -> list[int]:
        """Owner of every factor, in ``[f for b in blocks for f in b.factors]`` order (the reducer's)."""
        by_name = {f.name: self.owners[j] for j, (i, k) in enumerate(self.jobs) for f in blocks[i].parts()[k]}
        return [by_name[f.name] for b in blocks for f in b.factors]

    def multi_owner(self, i: int) -> bool:
        """True when block i's parts have more than one owner (its drafts need all-reduced traces)."""
        return len({self.owners[j] for j, (b, _) in enumerate(self.jobs) if b == i}) > 1


def plan_parts(blocks: Sequence[FisherBlock], world: int) -> OwnerPlan:
    """LPT assignment of every block part's inversion (cost B·d³ per factor) over ``world`` ranks."""
    jobs, costs = [], []
    for i, b in enumerate(blocks):
        for k, part in enumerate(b.parts()):
            jobs.append((i, k))
            costs.append(block_cost([(f.blocks, f.dim) for f in part]))
    assignment = assign_owners(costs, world)
    first = {i: assignment.owners[j] for j, (i, k) in reversed(list(enumerate(jobs)))}
    return OwnerPlan(tuple(jobs), assignment, tuple(first[i] for i in range(len(blocks))))


def plan_owners(blocks: Sequence[FisherBlock], group: Any = None) -> OwnerPlan:
    """:func:`plan_parts` over the group's ranks."""
    return plan_parts(blocks, world_size(group))


def global_traces(blocks: Sequence[FisherBlock], todo: Sequence[bool], plan: OwnerPlan, group: Any,
                  device: torch.device) -> Traces:
    """Factor name → trace, for the factors of the refreshed blocks whose parts have several owners: each owner
    puts in its factors' traces, one SUM all-reduce gives every rank all of them (no host sync). Empty (and no
    collective) when no such block is refreshed — decided from the plan and ``todo``, identical on every rank."""
    ids = [i for i, t in enumerate(todo) if t and plan.multi_owner(i)]
    if not ids or world_size(group) == 1:
        return {}
    factors = [f for i in ids for f in blocks[i].factors]
    me = rank(group)
    mine = {f.name for j, (i, k) in enumerate(plan.jobs) if todo[i] and plan.owners[j] == me
            for f in blocks[i].parts()[k]}
    vec = torch.zeros(len(factors), dtype=torch.float32, device=device)
    # owned factors only: a rank may hold stale values of others' factors (a checkpoint loads every value everywhere)
    traces = {k: t for k, f in enumerate(factors) if f.name in mine and (t := f.trace()) is not None}
    if traces:
        vec[list(traces)] = torch.stack(list(traces.values())).to(device)
    all_reduce_sum(vec, group)
    return {f.name: vec[k] for k, f in enumerate(factors)}


def _split(flat: Tensor, shapes: Sequence[Sequence[int]]) -> list[Tensor]:
    """Contiguous copies of consecutive pieces of ``flat`` (every rank gets identical tensors from identical bits)."""
    out, offset = [], 0
    for s in shapes:
        n = int(torch.Size(s).numel())
        out.append(flat[offset : offset + n].reshape(tuple(s)).clone())
        offset += n
    return out


def _draft_all(blocks: Sequence[FisherBlock], plan: OwnerPlan, mine: Sequence[int], traces: Traces, damping: float,
               method: str, device: torch.device) -> tuple[dict[int, list[Tensor]], Tensor]:
    """Owner side: the tensors of jobs ``mine`` and a failure code per job (0 = fine)."""
    failed: dict[int, float] = {}
    drafts: dict[int, PreconditionerDraft] = {}
    for j in mine:
        i, k = plan.jobs[j]
        try:
            drafts[j] = blocks[i].draft_part(k, damping, method, traces)
        except torch.linalg.LinAlgError as err:
            logger.error("SP-NGD: inverting %s failed: %s", blocks[i].name, err)
            failed[j] = 1.0
        except Exception:  # noqa: BLE001 - any error here must reach every rank through the agreement, not hang it
            logger.exception("SP-NGD: drafting the preconditioner of %s failed", blocks[i].name)
            failed[j] = 3.0
    finish_inverses([job for d in drafts.values() for job in d.jobs])
    for j, d in list(drafts.items()):
        errors = [job.error for job in d.jobs if job.error is not None]
        if errors:  # the eigendecomposition fallback of one of its factors did not converge
            logger.error("SP-NGD: inverting %s failed: %s", blocks[plan.jobs[j][0]].name, errors[0])
            failed[j] = 1.0
            del drafts[j]
    built = {j: d.build() for j, d in drafts.items()}
    return built, _failure_codes(len(plan.jobs), failed, built, device)


def _failure_codes(jobs: int, failed: dict[int, float], built: dict[int, list[Tensor]],
                   device: torch.device) -> Tensor:
    """Per job its code: ``failed``'s, 2 for a built preconditioner with a NaN/Inf (its tensors' max-abs norms summed,
    no host sync), else 0 — one vector assembled on ``device`` from device scalars, with no host → device upload (on
    CUDA each one is a stream sync)."""
    zero = torch.zeros((), device=device)
    norms = iter(max_abs([t for ts in built.values() for t in ts]))
    bad = {j: ~torch.isfinite(torch.stack([next(norms) for _ in ts]).sum()) for j, ts in built.items()}
    codes = [bad[j].to(device=device, dtype=zero.dtype) * 2.0 if j in bad else
             torch.full((), failed[j], device=device) if j in failed else zero for j in range(jobs)]
    return torch.stack(codes) if codes else zero.reshape(0)


def distributed_update(blocks: Sequence[FisherBlock], todo: Sequence[bool], plan: OwnerPlan, damping: float,
                       method: str, group: Any, share: bool, device: torch.device) -> tuple[int, list[Problem]]:
    """Recompute the preconditioners of the blocks flagged in ``todo``, each part on its owner (module docstring).

    Args:
        blocks: all blocks, in the order shared by every rank.
        todo: which blocks to refresh (must be identical on every rank).
        plan: owners from :func:`plan_owners`.
        damping: λ.
        method: ``"inverse"`` or ``"eigen"``.
        group: SP-NGD's process group.
        share: install every preconditioner on every rank (``comm_opt``); False installs each on its block owner
            only (parts owned elsewhere are broadcast to it).
        device: device of the communication buffers (the gradients').

    Returns:
        (bytes this rank handed to broadcasts, the agreed problems). With problems nothing was installed anywhere:
        every block keeps its previous preconditioner on every rank.
    """
    traces = global_traces(blocks, todo, plan, group, device)
    built, codes = draft_local(blocks, todo, plan, traces, damping, method, device, rank(group), world_size(group))
    return install_agreed(blocks, todo, plan, built, codes, damping, method, group, share, device)


def draft_local(blocks: Sequence[FisherBlock], todo: Sequence[bool], plan: OwnerPlan, traces: Traces,
                damping: float, method: str, device: torch.device, me: int,
                world: int) -> tuple[dict[int, list[Tensor]], Tensor]:
    """The local half of :func:`distributed_update` (no collective): this rank's parts among ``todo`` drafted and
    finished. Returns (job index → built tensors, failure code per job of the plan)."""
    jobs = [j for j, (i, _) in enumerate(plan.jobs) if todo[i]]
    return _draft_all(blocks, plan, [j for j in jobs if world == 1 or plan.owners[j] == me], traces, damping,
                      method, device)


def install_agreed(blocks: Sequence[FisherBlock], todo: Sequence[bool], plan: OwnerPlan,
                   built: dict[int, list[Tensor]], codes: Tensor, damping: float, method: str, group: Any,
                   share: bool, device: torch.device) -> tuple[int, list[Problem]]:
    """The collective half of :func:`distributed_update`: agree on every owner's failure ``codes``, then broadcast
    and install the ``built`` tensors where the placement wants them. Returns as :func:`distributed_update`."""
    me, world = rank(group), world_size(group)
    owners = plan.owners
    jobs = [j for j, (i, _) in enumerate(plan.jobs) if todo[i]]
    agreed = agree([codes], group, device)
    problems, seen = [], set()
    for j, c in enumerate(agreed):  # one owner per job: the sum is that owner's code
        i = plan.jobs[j][0]
        if c != 0.0 and i not in seen:
            seen.add(i)
            problems.append(Problem(blocks[i].name, f"inverting on rank {owners[j]} failed: "
                                                    f"{INVERSION_FAILURES[int(c)]}"))
    if problems:
        return 0, problems
    received: dict[int, list[Tensor]] = {}
    sent = 0
    for owner in range(world):
        mine = [j for j in jobs if owners[j] == owner]
        # what must leave the owner: everything (comm_opt), or the parts of blocks another rank preconditions
        out = mine if share else [j for j in mine if plan.block_owners[plan.jobs[j][0]] != owner]
        kept = [j for j in mine if j not in out]
        for ids, travel in ((out, world > 1), (kept, False)):
            if not ids or not (travel or owner == me or world == 1):
                continue
            shapes = [s for j in ids for s in blocks[plan.jobs[j][0]].part_shapes(plan.jobs[j][1], method)]
            numel = sum(int(torch.Size(s).numel()) for s in shapes)
            if owner == me or world == 1:
                flat = torch.cat([t.reshape(-1).float() for j in ids for t in built[j]])
            else:
                flat = torch.empty(numel, dtype=torch.float32, device=device)
            if travel:
                broadcast(flat, owner, group)
                sent += numel * 4
            tensors = _split(flat, shapes)
            for j in ids:
                n = len(blocks[plan.jobs[j][0]].part_shapes(plan.jobs[j][1], method))
                received[j], tensors = tensors[:n], tensors[n:]
    for i, t in enumerate(todo):
        if not t:
            continue
        if share or world == 1 or plan.block_owners[i] == me:
            parts = [received[j] for j in jobs if plan.jobs[j][0] == i]
            blocks[i].install_parts(parts, method, damping)
        blocks[i].mark_ready()
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
