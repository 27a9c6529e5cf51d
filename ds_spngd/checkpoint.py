"""SP-NGD's per-rank checkpoint shards: what each rank saves and how shards from any world size are merged.

Factor values live on their owner rank and, with ``precondition_mode="mem_opt"``, so do preconditioners; every rank
therefore saves its own shard (:meth:`ds_spngd.SPNGD.spngd_state`, written as :data:`SHARD_PATTERN` next to an
engine's files) and loading merges all of them (:func:`merge_shards`, applied by
:meth:`ds_spngd.SPNGD.load_sharded_state`). The merged state is moved to each block's device by
:meth:`ds_spngd.curvature.base.FisherBlock.load_state_dict`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ds_spngd.curvature.base import FisherBlock
from ds_spngd.staleness import RefreshSchedule
from ds_spngd.transaction import SkipLedger

__all__ = ["SHARD_PATTERN", "check_block_names", "load_state", "merge_shards", "pack_state"]

SHARD_PATTERN = "spngd_rank{rank:05d}.pt"


def check_block_names(saved: Iterable[str], names: Iterable[str]) -> None:
    """Raise ValueError listing the missing and unexpected Fisher blocks when a checkpoint does not fit the model."""
    saved_set, name_set = set(saved), set(names)
    if saved_set != name_set:
        raise ValueError(
            f"checkpoint Fisher blocks {sorted(saved_set)} do not match the model's {sorted(name_set)} "
            f"(missing: {sorted(name_set - saved_set)}, unexpected: {sorted(saved_set - name_set)})")


def merge_shards(shards: Sequence[dict[str, Any]], names: Iterable[str]) -> tuple[dict[str, Any],
                                                                                 dict[str, dict[str, Any]]]:
    """Merge every rank's :meth:`ds_spngd.SPNGD.spngd_state` into one.

    Each factor's value is taken from the shard that holds it, the preconditioner (and the polar direction's
    momentum) from any shard that holds one,
    ``ready`` is true when any shard says so.

    Returns:
        (the first shard's top-level fields — ``steps``, counters —, block name → merged block state).

    Raises:
        ValueError: no shard, shards from different steps, or Fisher blocks that do not match ``names``.
    """
    if not shards:
        raise ValueError("no SP-NGD state shard to load")
    steps = {int(s["steps"]) for s in shards}
    if len(steps) != 1:
        raise ValueError(f"SP-NGD state shards come from different steps {sorted(steps)}")
    names = list(names)
    merged: dict[str, dict[str, Any]] = {}
    for shard in shards:
        check_block_names(shard["blocks"], names)
        for name, state in shard["blocks"].items():
            cur = merged.setdefault(name, dict(state))
            for key, val in state.items():
                if isinstance(val, dict) and val.get("value") is not None:
                    cur[key] = val  # a factor held by this shard's rank
                elif key == "direction_momentum" and val is not None:
                    cur[key] = val  # the polar momentum of the rank(s) preconditioning the block
                elif key == "preconditioner" and val is not None:
                    cur[key], cur["method"] = val, state.get("method")
                elif key == "ready":
                    cur[key] = bool(cur.get(key)) or bool(val)
    return {k: v for k, v in shards[0].items() if k != "blocks"}, merged



def pack_state(steps: int, ledger: SkipLedger, config: dict[str, Any], world: int, rank: int,
               blocks: Sequence[FisherBlock], refresh: RefreshSchedule) -> dict[str, Any]:
    """One rank's shard: counters, config, and every block's factors / preconditioner as held here (factor values on
    their owner only; preconditioners where the placement keeps them)."""
    return {"steps": steps, "skipped_steps": ledger.skipped_steps, "consecutive_skips": ledger.consecutive_skips,
            "config": config, "world_size": world, "rank": rank, "blocks": {b.name: b.state_dict() for b in blocks},
            "refresh": refresh.state_dict()}


def load_state(shards: Sequence[dict[str, Any]], blocks: Sequence[FisherBlock], ledger: SkipLedger,
               refresh: RefreshSchedule) -> int:
    """Restore blocks, skip counters and the refresh schedule from every rank's :func:`pack_state` (any world size);
    returns the step counter.

    Raises:
        ValueError: no shard, shards from different steps, or Fisher blocks that do not match ``blocks``.
    """
    top, merged = merge_shards(shards, [b.name for b in blocks])
    for b in blocks:
        b.load_state_dict(merged[b.name])
    ledger.skipped_steps = int(top.get("skipped_steps", 0))
    ledger.consecutive_skips = int(top.get("consecutive_skips", 0))
    refresh.load_state_dict(top.get("refresh"))
    return int(top["steps"])
