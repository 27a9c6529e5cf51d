"""SP-NGD's own gradient schedule (``precondition_mode: "reduce_scatter"``, ZeRO stage 0; Osawa et al. CVPR 2019,
arXiv:1811.12019 §4 and Fig. 3): each layer's gradient goes to the one rank that preconditions it, instead of to
every rank.

The engine's gradient all-reduce is off (turned off by the engine integration, which reads
:attr:`ds_spngd.SPNGD.reduces_gradients`), so at the accumulation boundary every rank holds its *local* gradients. Then

1. the blocks' gradients are packed into per-owner buckets (blocks in backward order, ``bucket_cap_mb``) and
   ``reduce``d (SUM) to the block's owner rank — asynchronously from post-accumulate-grad hooks during the boundary
   backward, strictly in plan order, each bucket as soon as it and every earlier one are complete (the overlap of the
   paper's reduce-scatter with the backward pass); the step launches what is left;
2. the owner divides by the world size (the global mean gradient, as DeepSpeed's all-reduce would give), preconditions
   its blocks only, and every owner broadcasts its blocks' directions (:func:`ds_spngd.comm.inversion.
   share_directions`: the all-gather) — a block without a preconditioner yet travels as its plain mean gradient;
3. parameters without a Fisher block are averaged by one all-reduce (:meth:`GradientReducer.average_rest`).

Bytes per step ≈ one all-reduce of the gradients (a reduce-scatter plus an all-gather), and no rank preconditions
another rank's blocks. The buckets travel on a communicator of their own (``group``): their launch times depend on
when hooks fire, which may differ between ranks, so they must not interleave with the step's other collectives.
Buffers are packed in the gradients' dtype (bf16 models send bf16, the paper's half-precision gradients) on the
gradients' device.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from ds_spngd.comm.collectives import all_reduce_sum, rank, reduce_sum, wait_all, world_size
from ds_spngd.comm.factor_reduction import bucket_groups
from ds_spngd.curvature.base import FisherBlock

__all__ = ["GradientReducer", "GradBucket", "plan_grad_buckets"]


@dataclass(eq=False)
class GradBucket:
    """Blocks whose gradients travel together to one owner: one flat buffer, one ``reduce``."""

    owner: int
    blocks: list[int] = field(default_factory=list)
    numel: int = 0


def plan_grad_buckets(blocks: Sequence[FisherBlock], owners: Sequence[int], cap_numel: int) -> list[GradBucket]:
    """Per-owner buckets of at most ``cap_numel`` gradient elements (a larger block travels alone), in launch order:
    blocks in reverse module order (the order their gradients complete in backward), a bucket launched once its last
    block is complete (:func:`ds_spngd.comm.factor_reduction.bucket_groups`).

    Raises:
        ValueError: ``cap_numel`` < 1 or one owner per block not given.
    """
    if len(owners) != len(blocks):
        raise ValueError(f"{len(blocks)} blocks but {len(owners)} owners")
    order = list(range(len(blocks) - 1, -1, -1))
    sizes = [sum(p.numel() for p in blocks[i].params) for i in order]
    return [GradBucket(o, [order[k] for k in items], sum(sizes[k] for k in items))
            for o, items in bucket_groups(sizes, [owners[i] for i in order], cap_numel)]


class GradientReducer:
    """Reduces each block's gradient to its owner (see the module docstring).

    Args:
        blocks: the Fisher blocks (their ``params`` are the tensors whose gradients the backward produces).
        owners: the block owner of each block (group ranks; :attr:`ds_spngd.comm.inversion.OwnerPlan.block_owners`).
        group: the communicator the buckets travel on (a private one: see the module docstring).
        cap_bytes: bucket payload in bytes (at 4 bytes per element).
        overlap: launch buckets from the hooks during the boundary backward (else all at :meth:`complete`).

    Attributes:
        armed: True while the running backward ends a gradient-accumulation cycle (set through :meth:`arm` by the
            engine glue before every backward; True by default: without DeepSpeed every backward is the last one).
        stats: ``grad_bytes`` (payload this rank handed to reduces, all-reduce of the rest included), ``buckets``,
            ``buckets_early`` (launched from hooks), ``grad_wait_s``.
    """

    def __init__(self, blocks: Sequence[FisherBlock], owners: Sequence[int], group: Any, cap_bytes: int,
                 overlap: bool = True) -> None:
        self.blocks, self.owners, self.group, self.overlap = list(blocks), list(owners), group, overlap
        self.buckets = plan_grad_buckets(self.blocks, self.owners, max(1, cap_bytes // 4))
        self._bucket_of = {i: k for k, b in enumerate(self.buckets) for i in b.blocks}
        self._need = [sum(len(blocks[i].params) for i in b.blocks) for b in self.buckets]
        self.armed = True
        self._handles: list[RemovableHandle] = []
        self.stats: dict[str, float] = {}
        self._reset()
        if world_size(group) > 1:
            for i, b in enumerate(self.blocks):
                for p in b.params:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook(i)))

    def _reset(self) -> None:
        self._seen = [0] * len(self.buckets)
        self._next = 0
        self._flights: list[tuple[Tensor, Any]] = []
        self._early = 0

    def arm(self, final: bool) -> None:
        """Tell the hooks whether the coming backward is the last of an accumulation cycle."""
        self.armed = final

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, i: int) -> Any:
        def on_grad(_: Tensor) -> None:
            if not (self.armed and self.overlap):
                return
            k = self._bucket_of[i]
            if k < self._next:
                return  # launched already (a parameter reached twice): complete() reports nothing, the sum is sent
            self._seen[k] += 1
            while self._next < len(self.buckets) and self._seen[self._next] >= self._need[self._next]:
                self._launch(self._next)
                self._early += 1

        return on_grad

    def _launch(self, k: int) -> None:
        bucket = self.buckets[k]
        params = [p for i in bucket.blocks for p in self.blocks[i].params]
        dtype = next((p.grad.dtype for p in params if p.grad is not None), params[0].dtype)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                          for p in params])
        self._flights.append((flat, reduce_sum(flat, bucket.owner, self.group, async_op=True)))
        self._next = k + 1

    def complete(self) -> dict[int, list[Tensor]]:
        """Launch the remaining buckets and wait for all of them.

        Returns:
            block index → its mean gradient over the ranks (fp32, the parameters' shapes), for the blocks this rank
            owns (every block on one rank).
        """
        while self._next < len(self.buckets):
            self._launch(self._next)
        t0 = time.perf_counter()
        wait_all(h for _, h in self._flights)
        wait_s = time.perf_counter() - t0
        me, world = rank(self.group), world_size(self.group)
        out: dict[int, list[Tensor]] = {}
        sent = 0
        for bucket, (flat, _) in zip(self.buckets, self._flights, strict=True):
            sent += flat.numel() * flat.element_size() if world > 1 else 0
            if world > 1 and bucket.owner != me:
                continue
            mean = flat.float() / world
            off = 0
            for i in bucket.blocks:
                grads = []
                for p in self.blocks[i].params:
                    grads.append(mean[off : off + p.numel()].view_as(p))
                    off += p.numel()
                out[i] = grads
        self.stats = {"grad_bytes": float(sent), "buckets": float(len(self.buckets)),
                      "buckets_early": float(self._early), "grad_wait_s": wait_s}
        self._reset()
        self.armed = True
        return out

    def discard(self) -> None:
        """Complete and drop this step's reductions (the step is skipped or fails). Always every bucket: a rank whose
        hooks launched none must still issue them, or the ranks that did would wait on it."""
        self.complete()

    def average_rest(self, params: Sequence[Tensor]) -> int:
        """Replace each ``p.grad`` (None → zeros) of ``params`` (those without a block) by its mean over the ranks,
        with one SUM all-reduce. Returns the payload bytes."""
        world = world_size(self.group)
        if world == 1 or not params:
            return 0
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
        all_reduce_sum(flat, self.group)
        flat /= world
        off = 0
        for p in params:
            g = flat[off : off + p.numel()].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            off += p.numel()
        return flat.numel() * 4
