"""The distributed plan of one SP-NGD optimizer on one data-parallel group (Osawa et al. arXiv:1811.12019 §4): the
private communicator, who owns which block part (LPT), the factor buckets reduced to those owners, and the placement
strategy of ``precondition_mode``. Built from shapes and the world size only, so every rank builds the same plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ds_spngd.comm.collectives import backend, private_group, world_size
from ds_spngd.comm.factor_reduction import COMM_DTYPES, FactorReducer
from ds_spngd.comm.inversion import OwnerPlan, plan_owners
from ds_spngd.config import SPNGDConfig
from ds_spngd.curvature.base import FisherBlock
from ds_spngd.gradients import GradientAccess
from ds_spngd.placement import Placement, make_placement
from ds_spngd.staleness import RefreshSchedule

__all__ = ["DistributedPlan", "plan_distributed"]


@dataclass
class DistributedPlan:
    """What :func:`plan_distributed` built.

    Attributes:
        group: SP-NGD's private copy of the data-parallel group.
        owners: the LPT owners of every block part.
        reducer: the factor reducer (packed factors in ``comm_dtype``, per-owner buckets).
        placement: the ``precondition_mode`` strategy, set up for these owners.
    """

    group: Any
    owners: OwnerPlan
    reducer: FactorReducer
    placement: Placement


def plan_distributed(blocks: Sequence[FisherBlock], cfg: SPNGDConfig, refresh: RefreshSchedule, dp_group: Any,
                     grads: GradientAccess, old: DistributedPlan | None) -> DistributedPlan:
    """Plan owners, factor buckets and the placement for ``dp_group`` (None = world); ``old``'s factor counts and
    hooks are carried over / removed. A collective on first use of a group (the private communicators).

    Raises:
        ValueError: the placement cannot work with ``grads`` (``reduce_scatter`` with ZeRO partitions).
    """
    group = private_group(dp_group)
    owners = plan_owners(blocks, group)
    factors = [f for b in blocks for f in b.factors]
    dtype_name = cfg.comm_dtype
    if dtype_name == "auto":
        dtype_name = "bf16" if "nccl" in backend(group) else "fp32"
    cap = int(cfg.bucket_cap_mb * (1 << 20))
    reducer = FactorReducer(factors, owners.factor_owners(blocks), group, COMM_DTYPES[dtype_name], cap,
                            cfg.overlap_comm)
    if old is not None:
        reducer.adopt_counts(old.reducer)
        old.placement.remove()
    reducer.set_due(refresh.due_mask())
    placement = make_placement(cfg.precondition_mode, world_size(group))
    placement.setup(blocks, owners.block_owners, dp_group, grads, cap, cfg.overlap_comm)
    return DistributedPlan(group, owners, reducer, placement)
