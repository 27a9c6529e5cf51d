"""Where preconditioners live and how directions are shared: one placement strategy per ``precondition_mode``.

This is the only module that turns the ``precondition_mode`` string into behaviour (:func:`make_placement`,
:data:`PLACEMENTS`); the step (:class:`ds_spngd.SPNGD`), the inversion transaction
(:func:`ds_spngd.comm.inversion.distributed_update`), the memory plan (:mod:`ds_spngd.memory`) and the cost model
(:mod:`ds_spngd.cost_model`) all ask the strategy. Owners come from the LPT plan
(:class:`ds_spngd.comm.inversion.OwnerPlan`, one owner per block part; the owner of a block's first part is its
*block owner*).

* :class:`CommOpt` (``"comm_opt"``, default): every rank holds every preconditioner (broadcast on inversion steps)
  and preconditions every block's already averaged gradient itself; nothing extra travels between inversions.
* :class:`MemOpt` (``"mem_opt"``): each block owner holds its blocks' preconditioners, preconditions their gradients
  (under ZeRO 1-3 the block's gradient is first rebuilt on its owner) and broadcasts the directions every step
  (:func:`ds_spngd.comm.inversion.share_directions`): every inverse is held by one rank only (SP-NGD's scheme).
* :class:`ReduceScatter` (``"reduce_scatter"``, ZeRO 0; Osawa et al. CVPR 2019, arXiv:1811.12019 §4): the engine's
  gradient all-reduce is off; each block's local gradients are reduced to its owner during the backward pass
  (:class:`ds_spngd.comm.grad_reduction.GradientReducer`), the owner preconditions the mean gradient — or passes it
  on while the block has no preconditioner yet — and broadcasts the result; parameters without a block are averaged
  by one all-reduce.

On one rank every mode is :class:`CommOpt` (nothing travels). KL-clipping (Ba et al. ICLR 2017 §5; Osawa et al.
§3.3) needs ν = min(1, sqrt(κ / (η² Σ F̂⁻¹g·g))) over every preconditioned block: owners add their blocks' partial
sums into the shared buffer, so every rank gets the same ν.

Byte plans use the one ring model of :func:`ds_spngd.comm.wire.ring_bytes` (bytes each rank sends per collective).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ds_spngd.comm.collectives import private_group, rank
from ds_spngd.comm.grad_reduction import GradientReducer
from ds_spngd.comm.inversion import share_directions
from ds_spngd.comm.wire import ring_bytes
from ds_spngd.curvature.base import FisherBlock
from ds_spngd.gradients import BlockGrads, GradientAccess, Position
from ds_spngd.polar import PolarSettings, polar_block, takes_polar
from ds_spngd.update import kl_clip_factor

__all__ = ["PLACEMENTS", "CommOpt", "DirectionInputs", "MemOpt", "Placement", "ReduceScatter", "make_placement"]

Stats = dict[str, "float | Tensor"]


@dataclass
class DirectionInputs:
    """What one step's preconditioning reads (identical structure on every rank).

    Attributes:
        blocks: every Fisher block, in the order shared by all ranks.
        grads: the gradient access (:class:`ds_spngd.gradients.GradientAccess`).
        block_owners: the block owner of each block (group ranks).
        group: SP-NGD's process group.
        device: device of the buffers (the gradients').
        kl_clip: κ, or None for no KL-clipping.
        lr: η of the first parameter group (KL-clipping's step size).
        params_without_block: the optimizer's parameters no block preconditions (``param_groups`` order).
        polar: ``direction: "polar"``'s settings (:mod:`ds_spngd.polar`), or None for natural-gradient directions.
    """

    blocks: Sequence[FisherBlock]
    grads: GradientAccess
    block_owners: Sequence[int]
    group: Any
    device: torch.device
    kl_clip: float | None
    lr: float
    params_without_block: Sequence[Tensor]
    polar: PolarSettings | None = None


class Placement:
    """A ``precondition_mode``: who holds which preconditioner, who preconditions which block, how directions travel,
    and the memory and bytes that costs (module docstring).

    Attributes:
        mode: the ``precondition_mode`` value.
        shares_preconditioners: every rank installs every preconditioner (else the block owner only).
        reduces_gradients: SP-NGD reduces the gradients itself, so the engine's all-reduce must be off.
    """

    mode: ClassVar[str]
    shares_preconditioners: ClassVar[bool] = False
    reduces_gradients: ClassVar[bool] = False

    # ---- set-up and the engine's backward ---------------------------------------------------------------------
    def setup(self, blocks: Sequence[FisherBlock], block_owners: Sequence[int], group: Any, grads: GradientAccess,
              cap_bytes: int, overlap: bool) -> None:
        """Build what the placement needs for the data-parallel ``group`` (called by
        :meth:`ds_spngd.SPNGD.setup_distributed`)."""

    def begin_backward(self, boundary: bool) -> None:
        """The coming backward ends a gradient-accumulation cycle (``boundary``) or not."""

    def discard(self) -> None:
        """The step is skipped or failed: complete and drop whatever this step launched."""

    def remove(self) -> None:
        """Detach hooks."""

    # ---- the step ---------------------------------------------------------------------------------------------
    def preconditions(self, block_owner: int, me: int) -> bool:
        """True when this rank computes the direction of a block owned by ``block_owner``."""
        return block_owner == me

    def gather(self, job: DirectionInputs, ready_all: list[int], stats: Stats) -> tuple[BlockGrads, list[int],
                                                                                        set[int], int]:
        """The gradients to precondition: (block → gradients on the ranks that precondition it, the blocks whose
        directions this step produces, those among them passed on unpreconditioned, bytes sent)."""
        ready = job.grads.available(ready_all)
        grads, sent = job.grads.block_grads(ready, job.block_owners, job.group)
        return grads, ready, set(), sent

    def share(self, nat: BlockGrads, job: DirectionInputs, ready: list[int], vg: Tensor) -> tuple[BlockGrads, Tensor,
                                                                                                   int]:
        """Make every block's direction known to every rank: (directions, Σ F̂⁻¹g·g over all blocks, bytes)."""
        shapes = {i: job.grads.shapes(i) for i in ready}
        out, total, sent = share_directions(nat, shapes, job.block_owners, vg, job.group, job.device)
        return out, total.double(), sent

    # ---- plans from shapes ------------------------------------------------------------------------------------
    def direction_buffer_bytes(self, block_numel: int) -> int:
        """Per-step buffer bytes of directions (and gradient buckets) a rank holds (:mod:`ds_spngd.memory`)."""
        return 4 * block_numel

    def step_bytes(self, grad_numel: int, block_numel: int, grad_bytes: int, direction_bytes: int,
                   world: int) -> float:
        """Bytes each rank sends every step for ``grad_numel`` gradient elements of ``grad_bytes`` each
        (``block_numel`` of them with a Fisher block) and directions of ``direction_bytes`` per element: the engine's
        all-reduce, then every rank broadcasts its blocks' directions and one partial KL-clip sum."""
        return (ring_bytes("all_reduce", grad_numel * grad_bytes, world)
                + ring_bytes("broadcast", (block_numel + world) * direction_bytes, world))

    def inversion_bytes(self, every_part: float, moved_parts: float, world: int) -> float:
        """Bytes each rank sends on an inversion step: preconditioner parts of ``every_part`` bytes in all,
        ``moved_parts`` of them drafted by another rank than their block owner."""
        return ring_bytes("broadcast", moved_parts, world)

    def precondition_flops(self, per_block: Sequence[float], block_owners: Sequence[int], world: int) -> float:
        """The busiest rank's preconditioning FLOPs per step."""
        per_owner = [0.0] * world
        for f, owner in zip(per_block, block_owners, strict=True):
            per_owner[owner] += f
        return max(per_owner)


class CommOpt(Placement):
    """Every rank holds every preconditioner and preconditions every block (module docstring)."""

    mode = "comm_opt"
    shares_preconditioners = True

    def preconditions(self, block_owner: int, me: int) -> bool:
        return True

    def gather(self, job: DirectionInputs, ready_all: list[int], stats: Stats) -> tuple[BlockGrads, list[int],
                                                                                        set[int], int]:
        ready = job.grads.available(ready_all)
        grads, sent = job.grads.block_grads(ready, None, job.group)
        return grads, ready, set(), sent

    def share(self, nat: BlockGrads, job: DirectionInputs, ready: list[int], vg: Tensor) -> tuple[BlockGrads, Tensor,
                                                                                                   int]:
        return nat, vg, 0

    def direction_buffer_bytes(self, block_numel: int) -> int:
        return 0

    def step_bytes(self, grad_numel: int, block_numel: int, grad_bytes: int, direction_bytes: int,
                   world: int) -> float:
        return ring_bytes("all_reduce", grad_numel * grad_bytes, world)

    def inversion_bytes(self, every_part: float, moved_parts: float, world: int) -> float:
        return ring_bytes("broadcast", every_part, world)

    def precondition_flops(self, per_block: Sequence[float], block_owners: Sequence[int], world: int) -> float:
        return float(sum(per_block))


class MemOpt(Placement):
    """Block owners hold, apply and broadcast (module docstring)."""

    mode = "mem_opt"


class ReduceScatter(Placement):
    """SP-NGD's own gradient schedule at ZeRO 0 (module docstring).

    Attributes:
        reducer: the gradient buckets and their hooks (None until :meth:`setup` on several ranks).
    """

    mode = "reduce_scatter"
    reduces_gradients = True

    def __init__(self) -> None:
        self.reducer: GradientReducer | None = None

    def setup(self, blocks: Sequence[FisherBlock], block_owners: Sequence[int], group: Any, grads: GradientAccess,
              cap_bytes: int, overlap: bool) -> None:
        """Build the gradient buckets on a private copy of ``group`` (a communicator of their own).

        Raises:
            ValueError: the gradients are ZeRO partitions (the mode needs whole local gradients: ZeRO stage 0).
        """
        if grads.partitioned:
            raise ValueError('optimizer.params.precondition_mode="reduce_scatter" needs ZeRO stage 0 (DeepSpeed\'s '
                             'gradient all-reduce is replaced); use "comm_opt" or "mem_opt" with ZeRO 1-3')
        self.reducer = GradientReducer(blocks, block_owners, private_group(group, "gradients"), cap_bytes, overlap)

    def begin_backward(self, boundary: bool) -> None:
        if self.reducer is not None:
            self.reducer.arm(boundary)

    def discard(self) -> None:
        if self.reducer is not None:  # its buckets still complete, so every rank's collectives stay matched
            self.reducer.discard()

    def remove(self) -> None:
        if self.reducer is not None:
            self.reducer.remove()
            self.reducer = None

    def gather(self, job: DirectionInputs, ready_all: list[int], stats: Stats) -> tuple[BlockGrads, list[int],
                                                                                        set[int], int]:
        assert self.reducer is not None, "setup() builds the gradient reducer first"
        grads = self.reducer.complete()
        rest_bytes = self.reducer.average_rest(job.params_without_block)
        stats["grad_bytes"] = float(self.reducer.stats.get("grad_bytes", 0.0) + rest_bytes)
        for key in ("grad_wait_s", "buckets", "buckets_early"):
            stats[key if key.startswith("grad") else f"grad_{key}"] = self.reducer.stats.get(key, 0.0)
        ready = list(range(len(job.blocks)))  # every block travels through its owner
        return grads, ready, set(ready) - set(ready_all), 0

    def direction_buffer_bytes(self, block_numel: int) -> int:
        return 8 * block_numel  # the directions and the gradient buckets reduced to the owners

    def step_bytes(self, grad_numel: int, block_numel: int, grad_bytes: int, direction_bytes: int,
                   world: int) -> float:
        """Block gradients reduced to their owners, the rest all-reduced, the directions gathered from the owners:
        one all-reduce's bytes when ``grad_bytes == direction_bytes``."""
        return (ring_bytes("reduce_scatter_tensor", block_numel * grad_bytes, world)
                + ring_bytes("all_reduce", (grad_numel - block_numel) * grad_bytes, world)
                + ring_bytes("all_gather_into_tensor", block_numel * direction_bytes, world))


PLACEMENTS: dict[str, type[Placement]] = {cls.mode: cls for cls in (CommOpt, MemOpt, ReduceScatter)}


def make_placement(mode: str, world: int) -> Placement:
    """The strategy of ``precondition_mode`` ``mode`` on ``world`` ranks (:class:`CommOpt` on one rank).

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in PLACEMENTS:
        raise ValueError(f"unknown precondition_mode {mode!r}; expected one of {sorted(PLACEMENTS)}")
    return CommOpt() if world == 1 else PLACEMENTS[mode]()


def directions(placement: Placement, job: DirectionInputs,
               stats: Stats) -> tuple[dict[Position, Tensor], dict[Position, Tensor | None]]:
    """Update directions per optimizer parameter position (group, index): F̂⁻¹g for block parameters (KL-clipped
    when configured), or the polar direction of Kronecker blocks with ``direction: "polar"`` (:mod:`ds_spngd.polar`);
    with :class:`ReduceScatter` also the mean gradient of blocks without a preconditioner.
    Parameters not in the result use their ``.grad`` (averaged here by :class:`ReduceScatter`).

    Returns:
        (directions, final): ``final`` marks the positions (None = whole, else a bool mask of elements) whose
        direction already holds its momentum — the polar blocks —, which the update applies without heavy ball.

    Writes ``precondition_bytes`` (and ``kl_clip_nu``, ``grad_*``) into ``stats``.
    """
    me = rank(job.group)
    ready_all = [i for i, b in enumerate(job.blocks) if b.has_preconditioner]
    grads, ready, plain, sent = placement.gather(job, ready_all, stats)
    if not ready:
        stats["precondition_bytes"] = 0.0
        return {}, {}
    polar = set() if job.polar is None else {i for i in ready if i not in plain and takes_polar(job.blocks[i])}
    nat: BlockGrads = {}
    vg = torch.zeros((), dtype=torch.float64, device=job.device)
    for i in ready:
        if not placement.preconditions(job.block_owners[i], me):
            continue
        if i in plain:
            nat[i] = [g.float().clone() for g in grads[i]]
            continue
        nat[i] = job.blocks[i].precondition(grads[i])
        if i in polar:
            assert job.polar is not None
            nat[i] = polar_block(job.blocks[i], nat[i], job.polar)  # type: ignore[arg-type]
        elif job.kl_clip is not None:
            for v, g in zip(nat[i], grads[i], strict=True):
                vg = vg + (v * g.float()).sum().double()
    nat, vg, shared = placement.share(nat, job, ready, vg)
    stats["precondition_bytes"] = float(sent + shared)
    if job.kl_clip is not None and len(plain) + len(polar) < len(ready):
        nu = kl_clip_factor(job.kl_clip, job.lr, vg)
        stats["kl_clip_nu"] = nu
        for i, vs in nat.items():
            if i not in plain and i not in polar:
                for v in vs:
                    v.mul_(nu)
    return job.grads.directions(nat), job.grads.final_mask(sorted(polar))
