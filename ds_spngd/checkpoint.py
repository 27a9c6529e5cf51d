"""SP-NGD's per-rank checkpoint shards: what each rank saves and how shards from any world size are merged.

Factor values live on their owner rank and, with ``precondition_mode="mem_opt"``, so do preconditioners; every rank
therefore saves its own shard (:data:`SHARD_PATTERN` next to DeepSpeed's files) and loading merges all of them. The
merged state is moved to each block's device by :meth:`ds_spngd.curvature.base.FisherBlock.load_state_dict`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ds_spngd.comm.collectives import world_size

if TYPE_CHECKING:
    from ds_spngd.optimizer import SPNGD

__all__ = ["SHARD_PATTERN", "check_block_names", "merge_shards", "spngd_state", "load_shards"]

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

    Each factor's value is taken from the shard that holds it, the preconditioner from any shard that holds one,
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
                elif key == "preconditioner" and val is not None:
                    cur[key], cur["method"] = val, state.get("method")
                elif key == "ready":
                    cur[key] = bool(cur.get(key)) or bool(val)
    return {k: v for k, v in shards[0].items() if k != "blocks"}, merged


def spngd_state(opt: SPNGD) -> dict[str, Any]:
    """SP-NGD's own state on this rank: counters, config, and every block's factors / preconditioner as held here
    (factor values on their owner only; preconditioners on every rank with comm_opt, owners with mem_opt)."""
    return {
        "steps": opt.steps,
        "skipped_steps": opt.skipped_steps,
        "consecutive_skips": opt.consecutive_skips,
        "config": opt.cfg.model_dump(),
        "world_size": world_size(opt.group),
        "rank": opt.rank,
        "blocks": {b.name: b.state_dict() for b in opt.blocks},
        "refresh": opt.refresh.state_dict(),
    }


def load_shards(opt: SPNGD, shards: list[dict[str, Any]]) -> None:
    """Restore SP-NGD's state from every rank's :meth:`spngd_state` (any world size; tensors are moved to each
    block's device).

    Raises:
        ValueError: no shard, shards from different steps, or Fisher blocks that do not match the model's.
    """
    top, merged = merge_shards(shards, [b.name for b in opt.blocks])
    for b in opt.blocks:
        b.load_state_dict(merged[b.name])
    opt.steps = int(top["steps"])
    opt.skipped_steps = int(top.get("skipped_steps", 0))
    opt.consecutive_skips = int(top.get("consecutive_skips", 0))
    opt.refresh.load_state_dict(top.get("refresh"))
    opt.plan_collection()

