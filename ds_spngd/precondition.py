"""Step 4 of SP-NGD's step: the update direction of every block, in the three ``precondition_mode`` placements.

* ``comm_opt``: every rank holds every preconditioner (broadcast on inversion steps) and preconditions every block's
  (already averaged) gradient itself — no communication here at stage 0;
* ``mem_opt``: each block owner preconditions its blocks and broadcasts the directions
  (:func:`ds_spngd.comm.inversion.share_directions`; under ZeRO 1/2 the block's gradient is first rebuilt on its
  owner);
* ``reduce_scatter`` (ZeRO 0; Osawa et al. CVPR 2019, arXiv:1811.12019 §4): the gradients were never all-reduced;
  each block's local gradients were reduced to its owner (:class:`ds_spngd.comm.grad_reduction.GradientReducer`,
  launched during the backward pass), the owner preconditions the mean gradient — or passes it on unchanged while the
  block has no preconditioner yet — and broadcasts the result; parameters without a block are averaged by one
  all-reduce.

KL-clipping (Ba et al. ICLR 2017 §5; Osawa et al. §3.3) needs ν = min(1, sqrt(κ / (η² Σ F̂⁻¹g·g))) over every
preconditioned block: owners add their blocks' partial sums into the shared buffer, so every rank gets the same ν.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ds_spngd.comm.collectives import world_size
from ds_spngd.comm.inversion import share_directions
from ds_spngd.update import kl_clip_factor

if TYPE_CHECKING:
    from ds_spngd.optimizer import SPNGD

__all__ = ["directions"]

Stats = dict[str, "float | Tensor"]


def directions(opt: SPNGD, device: torch.device, stats: Stats) -> dict[tuple[int, int], Tensor]:
    """Update directions per optimizer parameter position (group, index): F̂⁻¹g for block parameters (KL-clipped
    when configured); in ``reduce_scatter`` also the mean gradient of blocks without a preconditioner. Parameters
    not in the result use their ``.grad`` (averaged here in ``reduce_scatter``).

    Writes ``precondition_bytes`` (and ``kl_clip_nu``, ``grad_bytes``) into ``stats``.
    """
    assert opt._owners is not None
    owners = opt._owners.block_owners
    me = opt.rank
    world = world_size(opt.group)
    mode = opt.cfg.precondition_mode if world > 1 else "comm_opt"
    ready_all = [i for i, b in enumerate(opt.blocks) if b.has_preconditioner]
    plain: set[int] = set()
    if mode == "reduce_scatter":
        assert opt.grad_reducer is not None
        grads = opt.grad_reducer.complete()
        rest_bytes = opt.grad_reducer.average_rest(opt.params_without_block())
        stats["grad_bytes"] = float(opt.grad_reducer.stats.get("grad_bytes", 0.0) + rest_bytes)
        for key in ("grad_wait_s", "buckets", "buckets_early"):
            stats[key if key.startswith("grad") else f"grad_{key}"] = opt.grad_reducer.stats.get(key, 0.0)
        ready = list(range(len(opt.blocks)))  # every block travels through its owner
        plain = set(ready) - set(ready_all)
        sent = 0
    else:
        ready = opt.grads.available(ready_all)
        if not ready:
            stats["precondition_bytes"] = 0.0
            return {}
        grads, sent = opt.grads.block_grads(ready, owners if mode == "mem_opt" else None, opt.group)
    nat: dict[int, list[Tensor]] = {}
    vg = torch.zeros((), dtype=torch.float64, device=device)
    for i in ready:
        if mode != "comm_opt" and owners[i] != me:
            continue
        if i in plain:
            nat[i] = [g.float().clone() for g in grads[i]]
            continue
        nat[i] = opt.blocks[i].precondition(grads[i])
        if opt.cfg.kl_clip is not None:
            for v, g in zip(nat[i], grads[i], strict=True):
                vg = vg + (v * g.float()).sum().double()
    if mode != "comm_opt":
        shapes = {i: [tuple(p.shape) for p in opt.blocks[i].params] for i in ready}
        nat, total, shared = share_directions(nat, shapes, owners, vg, opt.group, device)
        vg = total.double()
        sent += shared
    stats["precondition_bytes"] = float(sent)
    if opt.cfg.kl_clip is not None and len(plain) < len(ready):
        nu = kl_clip_factor(opt.cfg.kl_clip, float(opt.param_groups[0]["lr"]), vg)
        stats["kl_clip_nu"] = nu
        for i, vs in nat.items():
            if i not in plain:
                for v in vs:
                    v.mul_(nu)
    return opt.grads.directions(nat)
