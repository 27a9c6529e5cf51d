"""Per-epoch shuffling shared across data-parallel ranks (Goyal et al. 2017, arXiv:1706.02677, Sec. 3).

Every epoch uses ONE permutation of the ``n`` training samples, drawn from ``(seed, epoch)`` with a CPU
``torch.Generator`` so it is identical on every rank. The permutation is cut into ``steps_per_epoch = n // B``
global batches of ``B = world * gas * micro_batch`` samples; the remaining ``n mod B`` samples of that epoch's
permutation are dropped, so every rank takes the same number of steps and no sample appears twice in an epoch.

Index layout of global step ``s`` (``perm`` = the epoch's permutation)::

    perm[s*B : (s+1)*B]                                  the global batch of optimizer step s
      = rank 0 | rank 1 | ... | rank world-1             contiguous, B / world samples each (rank-major)
    rank r  -> perm[s*B + r*L : s*B + (r+1)*L]           L = gas * micro_batch (the rank's local batch)
      = micro 0 | micro 1 | ... | micro gas-1            contiguous, micro_batch samples each
    micro m -> perm[s*B + r*L + m*b : s*B + r*L + (m+1)*b]    b = micro_batch

Consequently the set of samples in one optimizer step depends only on ``(seed, epoch, s, B)``: 2 ranks with
micro-batch ``b`` see exactly the samples 1 rank sees with micro-batch ``2b``, and ``gas=2`` sees the samples of a
single micro-batch twice as large.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


def steps_per_epoch(n: int, global_batch: int) -> int:
    """Number of optimizer steps in one epoch of ``n`` samples at global batch ``global_batch``.

    Returns ``n // global_batch`` (the remainder is dropped).

    Raises:
        ValueError: if ``n`` or ``global_batch`` is not positive, or ``global_batch > n`` (an epoch of zero steps).
    """
    if n <= 0:
        raise ValueError(f"dataset size must be positive, got n={n}")
    if global_batch <= 0:
        raise ValueError(f"global batch must be positive, got {global_batch}")
    if global_batch > n:
        raise ValueError(f"global batch {global_batch} exceeds the dataset size {n}: an epoch would have no step")
    return n // global_batch


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shared permutation of epoch ``epoch``: int64 tensor of shape ``(n,)``, identical on every rank.

    Drawn from a CPU generator seeded with ``seed * 1_000_003 + epoch`` (independent of the global torch RNG).
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=gen)


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step is split over ranks and micro-batches.

    Attributes:
        rank: this process's data-parallel rank, ``0 <= rank < world``.
        world: data-parallel world size (number of ranks).
        micro_batch: samples per micro-batch on one rank (DeepSpeed ``train_micro_batch_size_per_gpu``).
        gas: micro-batches per optimizer step (DeepSpeed ``gradient_accumulation_steps``).
        seed: seed of the per-epoch permutations (must be equal on all ranks).
    """

    rank: int
    world: int
    micro_batch: int
    gas: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.world <= 0:
            raise ValueError(f"world size must be positive, got {self.world}")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside [0, {self.world})")
        if self.micro_batch <= 0:
            raise ValueError(f"micro batch must be positive, got {self.micro_batch}")
        if self.gas <= 0:
            raise ValueError(f"gradient accumulation steps must be positive, got {self.gas}")

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all ranks: ``world * gas * micro_batch``."""
        return self.world * self.gas * self.micro_batch

    @property
    def local_batch(self) -> int:
        """Samples per optimizer step on this rank: ``gas * micro_batch``."""
        return self.gas * self.micro_batch


def micro_batch_indices(n: int, plan: BatchPlan, epoch: int) -> Iterator[torch.Tensor]:
    """Yield this rank's micro-batch sample indices for one epoch, in training order.

    Yields ``steps_per_epoch(n, plan.global_batch) * plan.gas`` int64 tensors of shape ``(plan.micro_batch,)``,
    following the layout in the module docstring (step-major, then micro-batch).

    Raises:
        ValueError: if the global batch exceeds ``n``.
    """
    steps = steps_per_epoch(n, plan.global_batch)
    perm = epoch_permutation(n, plan.seed, epoch)
    for step in range(steps):
        rank_start = step * plan.global_batch + plan.rank * plan.local_batch
        for micro in range(plan.gas):
            start = rank_start + micro * plan.micro_batch
            yield perm[start : start + plan.micro_batch]


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous evaluation shard ``[start, stop)`` of ``n`` samples for ``rank`` of ``world``.

    Shards differ in size by at most one sample and cover ``range(n)`` exactly once (no padding, no duplicates),
    so per-rank correct counts can simply be summed with an all-reduce.
    """
    if world <= 0 or not 0 <= rank < world:
        raise ValueError(f"invalid rank {rank} for world size {world}")
    return (n * rank) // world, (n * (rank + 1)) // world


class TensorBatches:
    """In-memory training/evaluation batches over ``(x, y)`` tensors, following :class:`BatchPlan`.

    Args:
        x: inputs, any float tensor of shape ``(N, ...)``.
        y: int64 class labels of shape ``(N,)``.
        plan: the rank / world / micro-batch / accumulation layout.

    Raises:
        ValueError: if ``x`` and ``y`` disagree in length or ``y`` is not 1-D.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, plan: BatchPlan) -> None:
        if y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must share the first dimension; y must be 1-D")
        self.x = x
        self.y = y
        self.plan = plan

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, ``N // plan.global_batch`` (raises ValueError if that is 0)."""
        return steps_per_epoch(len(self), self.plan.global_batch)

    def __len__(self) -> int:
        """Number of samples ``N``."""
        return int(self.x.shape[0])

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``steps_per_epoch * gas`` micro-batches ``(x[idx], y[idx])`` of this rank for epoch ``epoch``."""
        for idx in micro_batch_indices(len(self), self.plan, epoch):
            yield self.x[idx], self.y[idx]

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's evaluation shard (see :func:`shard_range`) in order, ``batch_size`` at a time."""
        if batch_size <= 0:
            raise ValueError(f"eval batch size must be positive, got {batch_size}")
        start, stop = shard_range(len(self), self.plan.rank, self.plan.world)
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            yield self.x[lo:hi], self.y[lo:hi]
