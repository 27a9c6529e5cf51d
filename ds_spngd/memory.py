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
        and the per-step direction buffers of ``mem_opt``;
    ``momentum``: the heavy-ball buffers (fp32, the optimizer's parameters: whole at stage 0, the partition at ZeRO
        1/2);
    ``total``: their sum.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ds_spngd.comm.collectives import world_size

if TYPE_CHECKING:
    from ds_spngd.optimizer import SPNGD

__all__ = ["CATEGORIES", "memory_usage", "memory_plan", "format_memory"]

CATEGORIES = ("factors", "accumulators", "preconditioners", "comm_buffers", "momentum")


def _total(out: dict[str, int]) -> dict[str, int]:
    out["total"] = sum(out[k] for k in CATEGORIES)
    return out


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def memory_usage(opt: SPNGD) -> dict[str, int]:
    """Bytes of SP-NGD state this rank holds now, by category (see the module docstring)."""
    factors = [f for b in opt.blocks for f in b.factors]
    momentum = sum(_nbytes(s.get("momentum_buffer")) for s in opt.state.values())
    return _total({
        "factors": sum(_nbytes(f.value) for f in factors),
        "accumulators": sum(_nbytes(f.accum) for f in factors),
        "preconditioners": sum(b.preconditioner_bytes for b in opt.blocks),
        "comm_buffers": opt.reducer.buffer_bytes() if opt.reducer is not None else 0,
        "momentum": momentum,
    })


def memory_plan(opt: SPNGD, rank: int | None = None) -> dict[str, int]:
    """Bytes rank ``rank`` (default: this one) holds on a refresh + inversion step, computed from shapes alone.

    Assumes every block's hooks fire (accumulators for every factor) and momentum ≠ 0 in every group.
    """
    assert opt.reducer is not None and opt._owners is not None
    world = world_size(opt.group)
    me = opt.rank if rank is None else rank
    owners = opt._owners.owners
    owned = [b for i, b in enumerate(opt.blocks) if world == 1 or owners[i] == me]
    mem_opt = opt.cfg.precondition_mode == "mem_opt" and world > 1
    held = owned if mem_opt else list(opt.blocks)
    method = opt.cfg.inverse_method
    elem = torch.empty(0, dtype=opt.reducer.dtype, device="cpu").element_size()
    payload = sum(b.numel for b in opt.reducer.buckets) * elem
    directions = 4 * sum(p.numel() for b in opt.blocks for p in b.params) if mem_opt else 0
    momentum = 4 * opt.grads.momentum_numel() if any(float(g["momentum"]) != 0.0 for g in opt.param_groups) else 0
    return _total({
        "factors": sum(f.nbytes for b in owned for f in b.factors),
        "accumulators": sum(f.nbytes for b in opt.blocks for f in b.factors),
        "preconditioners": sum(4 * int(torch.Size(s).numel()) for b in held for s in b.preconditioner_shapes(method)),
        "comm_buffers": payload + sum(f.nbytes for b in owned for f in b.factors) + directions,
        "momentum": momentum,
    })


def format_memory(per_rank: dict[str, int], title: str) -> str:
    """One line: ``title``, then every category in MiB."""
    parts = ", ".join(f"{k} {per_rank[k] / 2**20:.2f}" for k in (*CATEGORIES, "total"))
    return f"{title} (MiB): {parts}"
