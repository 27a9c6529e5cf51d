"""Which rank owns which Fisher block's inversion: greedy longest-processing-time (LPT) on a cost model.

SP-NGD (Osawa et al. arXiv:1811.12019 §4) spreads the per-layer inversions over the data-parallel ranks; KAISA
(Pauloski et al. SC'21, arXiv:2107.01739) assigns them greedily by cost. LPT sorts jobs by decreasing cost and gives
each to the currently least-loaded rank; its makespan is at most 4/3 − 1/(3m) of the optimum (Graham 1969).

The jobs are block *parts* (:func:`ds_spngd.comm.inversion.plan_parts`: a whole block, or one diagonal block of a
side beyond ``max_factor_dim``). Cost of a part = Σ over its factors of the inversion cost: d³ for a d × d
Kronecker factor ("compute", Cholesky or eigendecomposition are Θ(d³)), or d² ("memory", what the owner must hold
and send). Unit-wise blocks are B tiny k × k systems: B·k³. Ties are broken by job index so that every rank computes
the same assignment.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["block_cost", "assign_owners", "Assignment"]


def block_cost(factor_shapes: Sequence[tuple[int, int]], kind: Literal["compute", "memory"] = "compute") -> float:
    """Cost of inverting one block.

    Args:
        factor_shapes: (B, d) for each factor of the block (B = 1 for Kronecker factors, channels for unit-wise).
        kind: ``"compute"`` (B·d³) or ``"memory"`` (B·d²).

    Raises:
        ValueError: for an unknown kind or a non-positive shape.
    """
    if kind not in ("compute", "memory"):
        raise ValueError(f"unknown cost kind {kind!r}: use 'compute' or 'memory'")
    power = 3 if kind == "compute" else 2
    total = 0.0
    for b, d in factor_shapes:
        if b < 1 or d < 1:
            raise ValueError(f"factor shape must be positive, got (B={b}, d={d})")
        total += float(b) * float(d) ** power
    return total


@dataclass(frozen=True)
class Assignment:
    """Result of :func:`assign_owners`.

    Attributes:
        owners: owner rank of each block, in block order.
        loads: summed cost per rank.
    """

    owners: tuple[int, ...]
    loads: tuple[float, ...]

    @property
    def imbalance(self) -> float:
        """max load / mean load (1.0 = perfect balance; ≥ 1)."""
        mean = sum(self.loads) / len(self.loads)
        return max(self.loads) / mean if mean > 0 else 1.0

    def blocks_of(self, rank: int) -> list[int]:
        """Indices of the blocks owned by ``rank``."""
        return [i for i, r in enumerate(self.owners) if r == rank]


def assign_owners(costs: Sequence[float], world_size: int) -> Assignment:
    """Greedy LPT assignment of blocks to ranks.

    Args:
        costs: cost of each block (≥ 0), in the fixed block order shared by all ranks.
        world_size: number of ranks (≥ 1). More ranks than blocks leaves some ranks without work.

    Returns:
        The deterministic :class:`Assignment` (identical on every rank for identical inputs).

    Raises:
        ValueError: world_size < 1 or a negative/NaN cost.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if any(not (c >= 0.0) for c in costs):
        raise ValueError("block costs must be non-negative numbers")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    heap = [(0.0, r) for r in range(world_size)]  # (load, rank): least-loaded rank first, lowest rank on ties
    owners = [0] * len(costs)
    loads = [0.0] * world_size
    for i in order:
        load, rank = heapq.heappop(heap)
        owners[i] = rank
        loads[rank] = load + costs[i]
        heapq.heappush(heap, (loads[rank], rank))
    return Assignment(tuple(owners), tuple(loads))
