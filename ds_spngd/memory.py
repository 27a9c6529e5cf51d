"""What SP-NGD's curvature state costs in memory, per rank (the spirit of kfac-pytorch's ``memory_usage()``).

Two views with the same keys (bytes):

* :func:`memory_usage` — the tensors this rank holds *now*;
* :func:`memory_plan` — what a given rank will hold on a factor-refresh + inversion step, computed from the shapes,
  the owners and the precondition mode before anything is allocated (every rank computes every rank's plan the
  same way, so the start-up report needs no collective).

Keys:
    ``factors``: running factor estimates (fp32 B·d², on each factor's owner);
    ``accumulators``: this step's local factor sums (fp32 B·d² per factor whose hooks fire, refresh steps only);
    ``preconditioners``: inverses / eigenbases (every rank with ``comm_opt``, owners with ``mem_opt``);
    ``comm_buffers``: packed factor payloads in ``comm_dtype`` plus the owners' unpacked fp32 sums (refresh steps),
        and the placement's per-step direction buffers (:meth:`ds_spngd.placement.Placement.direction_buffer_bytes`);
    ``momentum``: the heavy-ball buffers (fp32, the optimizer's parameters of the groups with momentum ≠ 0: whole at
        stage 0, each group's partition(s) at ZeRO 1/2/3);
    ``total``: their sum.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ds_spngd.comm.collectives import all_reduce_sum, backend, world_size
from ds_spngd.comm.factor_reduction import FactorReducer
from ds_spngd.comm.inversion import OwnerPlan, plan_parts
from ds_spngd.config import SPNGDConfig
from ds_spngd.curvature.base import FisherBlock, full_numel
from ds_spngd.gradients import GradientAccess
from ds_spngd.placement import make_placement
from ds_spngd.polar import takes_polar

__all__ = ["CATEGORIES", "memory_usage", "memory_plan", "format_memory", "check_memory", "memory_problem",
           "agree_on_memory", "block_bytes", "free_bytes", "plans_per_rank"]

CATEGORIES = ("factors", "accumulators", "preconditioners", "comm_buffers", "momentum")


class PlannedOptimizer(Protocol):
    """The public face of :class:`ds_spngd.SPNGD` these plans read."""

    cfg: SPNGDConfig
    blocks: list[FisherBlock]
    state: Any
    grads: GradientAccess
    group: Any

    @property
    def reducer(self) -> FactorReducer | None: ...

    @property
    def owner_plan(self) -> OwnerPlan | None: ...

    @property
    def rank(self) -> int: ...

    @property
    def device(self) -> torch.device: ...


def _total(out: dict[str, int]) -> dict[str, int]:
    out["total"] = sum(out[k] for k in CATEGORIES)
    return out


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def memory_usage(opt: PlannedOptimizer) -> dict[str, int]:
    """Bytes of SP-NGD state this rank holds now, by category (see the module docstring)."""
    factors = [f for b in opt.blocks for f in b.factors]
    momentum = sum(_nbytes(s.get("momentum_buffer")) for s in opt.state.values()) + sum(
        _nbytes(b.direction_momentum) for b in opt.blocks)  # heavy ball + the polar direction's momentum
    return _total({
        "factors": sum(_nbytes(f.value) for f in factors),
        "accumulators": sum(_nbytes(f.accum) for f in factors),
        "preconditioners": sum(b.preconditioner_bytes for b in opt.blocks),
        "comm_buffers": opt.reducer.buffer_bytes() if opt.reducer is not None else 0,
        "momentum": momentum,
    })


def memory_plan(opt: PlannedOptimizer, rank: int | None = None, world: int | None = None) -> dict[str, int]:
    """Bytes rank ``rank`` (default: this one) holds on a refresh + inversion step, computed from shapes alone.

    Args:
        opt: the optimizer.
        rank: the rank to plan for.
        world: plan for this many data-parallel ranks instead of the optimizer's group (owners re-assigned by the
            same LPT rule; e.g. a model built on the meta device, planned for 8 or 64 GPUs).

    Assumes every block's hooks fire (accumulators for every factor) and every parameter gets a gradient.
    """
    assert opt.reducer is not None and opt.owner_plan is not None
    plan = opt.owner_plan if world is None else plan_parts(opt.blocks, world)
    world = len(plan.assignment.loads)
    placement = make_placement(opt.cfg.precondition_mode, world)
    me = (opt.rank if rank is None else rank) % world
    mine = {f.name for j, (i, k) in enumerate(plan.jobs) if world == 1 or plan.owners[j] == me
            for f in opt.blocks[i].parts()[k]}
    owned_factors = [f for b in opt.blocks for f in b.factors if f.name in mine]
    owned = [b for i, b in enumerate(opt.blocks) if world == 1 or plan.block_owners[i] == me]
    held = list(opt.blocks) if placement.shares_preconditioners else owned
    method = opt.cfg.inverse_method
    elem = torch.empty(0, dtype=opt.reducer.dtype, device="cpu").element_size()
    payload = sum(b.numel for b in opt.reducer.all_buckets) * elem
    directions = placement.direction_buffer_bytes(sum(full_numel(p) for b in opt.blocks for p in b.params))
    momentum = 4 * opt.grads.momentum_numel()  # the groups with momentum ≠ 0
    if opt.cfg.direction == "polar":  # one d_out × d_A fp32 momentum per Kronecker block this rank preconditions
        momentum += sum(4 * sum(full_numel(p) for p in b.params) for b in held if takes_polar(b))
    return _total({
        "factors": sum(f.nbytes for f in owned_factors),
        "accumulators": sum(f.nbytes for b in opt.blocks for f in b.factors),
        "preconditioners": sum(4 * int(torch.Size(s).numel()) for b in held for s in b.preconditioner_shapes(method)),
        "comm_buffers": payload + sum(f.nbytes for f in owned_factors) + directions,
        "momentum": momentum,
    })


def plans_per_rank(opt: PlannedOptimizer) -> list[dict[str, int]]:
    """:func:`memory_plan` of every rank of the optimizer's group (computed locally: shapes and owners only)."""
    return [memory_plan(opt, r) for r in range(world_size(opt.group))]


def block_bytes(opt: PlannedOptimizer) -> list[tuple[str, int]]:
    """Per block, the fp32 bytes of its factors and preconditioner (one copy each), largest first."""
    method = opt.cfg.inverse_method
    sizes = [(b.name, sum(f.nbytes for f in b.factors)
              + sum(4 * int(torch.Size(s).numel()) for s in b.preconditioner_shapes(method))) for b in opt.blocks]
    return sorted(sizes, key=lambda t: -t[1])


def free_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device`` now (CUDA: the allocator's free memory; CPU: the system's
    available memory); None where unknown (e.g. the meta device)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            import psutil  # a DeepSpeed dependency
        except ImportError:  # pragma: no cover - DeepSpeed always brings it
            return None
        return int(psutil.virtual_memory().available)
    return None


def memory_problem(opt: PlannedOptimizer, free: int | None = None, margin: float = 0.9) -> str | None:
    """Why the SP-NGD state planned for the busiest rank does not fit the memory free now, or None when it fits.

    Computed before the first step, i.e. before any factor, accumulator or preconditioner is allocated. The plans
    come from the shapes (every rank computes every rank's), but free memory is read locally, so ranks may differ:
    the optimizer agrees on the answer with one reduced flag before raising (:func:`agree_on_memory`).

    Args:
        opt: the optimizer.
        free: bytes free (default: :func:`free_bytes` on the optimizer's device).
        margin: the fraction of ``free`` SP-NGD may plan to use.

    Returns:
        None, or a message naming the planned bytes per rank, the free bytes, the largest layers and the keys to turn.
    """
    free = free_bytes(opt.device) if free is None else free
    if free is None:
        return None
    plans = plans_per_rank(opt)
    worst = max(range(len(plans)), key=lambda r: plans[r]["total"])
    need = plans[worst]["total"]
    if need <= margin * free:
        return None
    top = ", ".join(f"{n} {b / 2**30:.2f} GiB" for n, b in block_bytes(opt)[:3])
    parts = ", ".join(f"{k} {plans[worst][k] / 2**30:.2f}" for k in CATEGORIES)
    cfg = opt.cfg
    return (
        f"SP-NGD's curvature state would need {need / 2**30:.2f} GiB on rank {worst} ({parts} GiB) but "
        f"{free / 2**30:.2f} GiB are free on {opt.device}. Largest layers (factors + preconditioner): {top}. "
        f"To fit: lower optimizer.params.max_factor_dim (now {cfg.max_factor_dim}) or set large_dim_method "
        f'"diagonal" (now "{cfg.large_dim_method}"), use precondition_mode "mem_opt" on more ranks (now '
        f'"{cfg.precondition_mode}"), or list the largest layers in skip_modules. memory_check=false skips '
        "this check.")


def check_memory(opt: PlannedOptimizer, free: int | None = None, margin: float = 0.9) -> None:
    """Raise :class:`MemoryError` with :func:`memory_problem`'s message when the plan does not fit (this rank's
    view; the optimizer itself agrees across ranks first)."""
    problem = memory_problem(opt, free, margin)
    if problem is not None:
        raise MemoryError(problem)


def agree_on_memory(opt: PlannedOptimizer) -> None:
    """Raise MemoryError on every rank together when the planned state does not fit some rank's free memory
    (:func:`ds_spngd.memory.memory_problem`; free memory is local, so the answer is agreed by one all-reduce)."""
    problem = memory_problem(opt)
    if world_size(opt.group) > 1:
        device = opt.device
        if "nccl" in backend(opt.group) and device.type != "cuda":
            return  # the model is not on its GPU yet (before deepspeed.initialize): attach() checks again
        flag = torch.tensor([0.0 if problem is None else 1.0], device=device)
        others = float(all_reduce_sum(flag, opt.group)) - (problem is not None)
        if problem is None and others > 0:
            problem = (f"SP-NGD's planned curvature state does not fit the free memory of {int(others)} other "
                       "rank(s) (their error names the layers and the keys to turn)")
    if problem is not None:
        raise MemoryError(problem)



def format_memory(per_rank: dict[str, int], title: str) -> str:
    """One line: ``title``, then every category in MiB."""
    parts = ", ".join(f"{k} {per_rank[k] / 2**20:.2f}" for k in (*CATEGORIES, "total"))
    return f"{title} (MiB): {parts}"
