"""SP-NGD's per-rank checkpoint shards: what each rank saves, how a shard set is checked before anything is loaded,
and how shards from any world size are merged.

Factor values live on their owner rank and, with ``precondition_mode="mem_opt"``, so do preconditioners; every rank
therefore saves its own shard (:meth:`ds_spngd.SPNGD.spngd_state`, written atomically by :func:`save_shard` as
:data:`SHARD_PATTERN` next to an engine's files) and loading merges all of them (:func:`merge_shards`, applied by
:meth:`ds_spngd.SPNGD.load_sharded_state`). The merged state is moved to each block's device by
:meth:`ds_spngd.curvature.base.FisherBlock.load_state_dict`.

A shard set is loaded only whole. :func:`scan_shards` reads every shard of a tag directory and refuses
(:class:`SPNGDCheckpointError`, naming the directory, the shard files and their ranks) when:

* a shard is **missing**: each shard records the ``world_size`` W and the ``rank`` of the run that saved it; the set
  must be exactly ranks 0..W-1 of one W (a gap, a duplicate, a rank ≥ W, or a file whose name says another rank than
  its content). Merging fewer shards would silently drop the factors / preconditioners those ranks owned;
* a shard is **unreadable** (truncated, corrupt, or not an SP-NGD shard): torch's own error does not name the file;
* the shards come from **different world sizes or different steps** (a mix of two saves);
* the shards belong to **another model**: their Fisher blocks (or a block's factors) differ from the model's;
* the directory does not exist or holds **no shard** at all (:class:`SPNGDCheckpointNotFoundError`, also a
  FileNotFoundError): it was not saved through ``ds_spngd.initialize``'s engine.

A world size different from the current one is fine when the shard set is complete: the shards are merged, and the
current placement takes what it needs from the merged state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ds_spngd.curvature.base import FisherBlock
from ds_spngd.staleness import RefreshSchedule
from ds_spngd.transaction import SkipLedger

logger = logging.getLogger("ds_spngd")

__all__ = ["SHARD_PATTERN", "SHARD_GLOB", "Fault", "SPNGDCheckpointError", "SPNGDCheckpointNotFoundError", "ShardScan",
           "atomic_save", "check_block_names", "checkpoint_error", "load_state", "merge_shards", "pack_state",
           "read_shards", "remove_stale_shards", "save_shard", "scan_shards", "pending_inversion"]

SHARD_PATTERN = "spngd_rank{rank:05d}.pt"
SHARD_GLOB = "spngd_rank*.pt"
_SHARD_NAME = re.compile(r"spngd_rank(\d+)\.pt")
_SHARD_KEYS = ("steps", "world_size", "rank", "blocks")
_HINT = ("nothing was loaded; load a complete tag, or pass load_optimizer_states=False to take the weights without "
         "SP-NGD's state")


class SPNGDCheckpointError(RuntimeError):
    """A checkpoint's SP-NGD shards cannot be loaded without losing or mixing state (nothing was loaded), or a
    rank could not write its shard.

    Attributes:
        tag_dir: the checkpoint's tag directory.
        files: names (in ``tag_dir``) of the missing / unreadable / mismatched shard files.
        ranks: the ranks those shards belong to.
    """

    def __init__(self, message: str, tag_dir: str = "", files: Iterable[str] = (), ranks: Iterable[int] = ()) -> None:
        super().__init__(message)
        self.tag_dir = tag_dir
        self.files = sorted(set(files))
        self.ranks = sorted(set(ranks))


class SPNGDCheckpointNotFoundError(SPNGDCheckpointError, FileNotFoundError):
    """The tag directory does not exist or holds no SP-NGD shard (also a FileNotFoundError)."""


@dataclass
class Fault:
    """One reason to refuse a shard set: ``text`` names the shard file(s) and rank(s); ``not_found``: the directory
    or every shard is absent."""

    text: str
    files: list[str] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    not_found: bool = False


@dataclass
class ShardScan:
    """What :func:`scan_shards` found: the readable shards (by file name) and the faults ([] = loadable)."""

    tag_dir: str
    shards: list[dict[str, Any]]
    faults: list[Fault]

    def error(self) -> SPNGDCheckpointError | None:
        """The error naming every fault (None when there is none)."""
        return checkpoint_error(self.tag_dir, [(None, self.tag_dir, self.faults)]) if self.faults else None


def _label(name: str, rank: int) -> str:
    return f"{name} (rank {rank})"


def checkpoint_error(tag_dir: str, reports: Sequence[tuple[int | None, str, Sequence[Fault]]],
                     what: str = "refused", hint: str = _HINT) -> SPNGDCheckpointError:
    """One error for the faults found, per reporting rank: ``(rank or None in one process, its tag dir, faults)``;
    ``what`` happened to the checkpoint and the ``hint`` end the message.

    Ranks that found the same faults in the same directory are reported together ("ranks 0, 1 found: ...").
    :class:`SPNGDCheckpointNotFoundError` when every fault is a missing directory / no shard at all.
    """
    groups: dict[tuple[str, tuple[str, ...]], list[int | None]] = {}
    for rank, where, faults in reports:
        if faults:
            groups.setdefault((where, tuple(f.text for f in faults)), []).append(rank)
    parts = []
    for (where, texts), ranks in groups.items():
        head = []
        if ranks != [None]:
            head.append(("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks) + " found")
        if where != tag_dir:
            head.append(f"in {where}")
        parts.append((" ".join(head) + ": " if head else "") + "; ".join(texts))
    every = [f for _, _, faults in reports for f in faults]
    cls = SPNGDCheckpointNotFoundError if every and all(f.not_found for f in every) else SPNGDCheckpointError
    on = " on every rank" if any(r is not None for r, _, _ in reports) else ""
    return cls(f"SP-NGD checkpoint {tag_dir} {what}{on}: " + " | ".join(parts) + f" ({hint})", tag_dir,
               [n for f in every for n in f.files], [r for f in every for r in f.ranks])


# ---- saving -----------------------------------------------------------------------------------------------------
def save_shard(state: dict[str, Any], tag_dir: str, rank: int) -> str:
    """Write one rank's shard as ``tag_dir/SHARD_PATTERN`` atomically (:func:`atomic_save`). Returns the path."""
    path = os.path.join(tag_dir, SHARD_PATTERN.format(rank=rank))
    atomic_save(state, path)
    return path


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` atomically: into a hidden temporary file of the same directory (flushed to
    disk; its name matches no shard pattern), then ``os.replace`` onto the real name, so a crash mid-save leaves the
    previous file or none, never a truncated one under the real name."""
    tag_dir = os.path.dirname(path) or "."
    tmp = os.path.join(tag_dir, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every file system)
        fd = os.open(tag_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_shards(tag_dir: str, world: int) -> list[str]:
    """Delete the shards of ranks ≥ ``world`` in ``tag_dir`` (left by an earlier save of the same tag by more ranks;
    they would make the new set look mixed). Returns the names removed."""
    removed = []
    for name, rank in _shard_files(tag_dir).items():
        if rank >= world:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(tag_dir, name))
            removed.append(name)
    return removed


# ---- checking a shard set before loading --------------------------------------------------------------------------
def _shard_files(tag_dir: str) -> dict[str, int]:
    """Shard file name → the rank its name says, sorted by name ({} when the directory is missing)."""
    try:
        names = sorted(os.listdir(tag_dir))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {n: int(m.group(1)) for n in names if (m := _SHARD_NAME.fullmatch(n))}


def scan_shards(tag_dir: str, model_blocks: Mapping[str, Iterable[str]] | Iterable[str]) -> ShardScan:
    """Read every shard of ``tag_dir`` (onto the CPU) and check that together they are one whole save of this model
    (see the module docstring for what is refused). Nothing is modified.

    Args:
        tag_dir: a checkpoint's tag directory.
        model_blocks: the model's Fisher block names, or block name → its factor names (then every shard's blocks
            must also hold those factors).

    Returns:
        The readable shards and every fault found (``scan.error()`` is the error to raise, None when loadable).
    """
    if not os.path.isdir(tag_dir):
        return ShardScan(tag_dir, [], [Fault("the tag directory does not exist", not_found=True)])
    files = _shard_files(tag_dir)
    if not files:
        return ShardScan(tag_dir, [], [Fault(f"the tag directory holds no SP-NGD shard ({SHARD_GLOB}); it was not "
                                             "saved through ds_spngd.initialize's engine", not_found=True)])
    read, faults = _read_all(tag_dir, files)
    unreadable = {r for f in faults for r in f.ranks}
    faults += _check_ranks(read, unreadable)
    faults += _check_steps(read)
    faults += _check_blocks(read, model_blocks)
    return ShardScan(tag_dir, [s for _, _, s in read], faults)


def read_shards(tag_dir: str, model_blocks: Mapping[str, Iterable[str]] | Iterable[str]) -> list[dict[str, Any]]:
    """The shards of ``tag_dir`` when :func:`scan_shards` finds them loadable (one process; a DeepSpeed engine agrees
    across its ranks instead, :mod:`ds_spngd.integrations.deepspeed.checkpoint`).

    Raises:
        SPNGDCheckpointError: a shard is missing, unreadable, from another save or from another model.
        SPNGDCheckpointNotFoundError: the directory does not exist or holds no shard.
    """
    scan = scan_shards(tag_dir, model_blocks)
    err = scan.error()
    if err is not None:
        raise err
    return scan.shards


def _read_all(tag_dir: str, files: dict[str, int]) -> tuple[list[tuple[str, int, dict[str, Any]]], list[Fault]]:
    """(name, rank by name, shard) of every readable shard, and a fault per unreadable one."""
    read: list[tuple[str, int, dict[str, Any]]] = []
    faults: list[Fault] = []
    for name, rank in files.items():
        try:
            shard = torch.load(os.path.join(tag_dir, name), map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - any failure to read names the file
            first = (str(err).strip().splitlines() or [""])[0].split(". ")[0]  # torch's blurb follows
            faults.append(Fault(f"{_label(name, rank)} is unreadable (truncated or corrupt): {type(err).__name__}: "
                                f"{first}", [name], [rank]))
            continue
        missing = [k for k in _SHARD_KEYS if not isinstance(shard, dict) or k not in shard]
        bad = not missing and not (isinstance(shard["blocks"], dict)
                                   and all(_is_int(shard[k]) for k in ("steps", "world_size", "rank")))
        if missing or bad:
            what = f"has no {', '.join(missing)}" if missing else "has malformed steps / world_size / rank / blocks"
            faults.append(Fault(f"{_label(name, rank)} is not an SP-NGD shard ({what})", [name], [rank]))
            continue
        read.append((name, rank, shard))
    return read, faults


def _is_int(value: Any) -> bool:
    try:
        int(value)
    except (TypeError, ValueError):
        return False
    return True


def _check_ranks(read: Sequence[tuple[str, int, dict[str, Any]]], unreadable: set[int]) -> list[Fault]:
    """One world size W, every rank 0..W-1 exactly once (unreadable files count as present: already reported)."""
    worlds = {int(s["world_size"]) for _, _, s in read}
    if len(worlds) > 1:
        labels = ", ".join(f"{n} (rank {int(s['rank'])} of {int(s['world_size'])})" for n, _, s in read)
        return [Fault(f"shards from different world sizes: {labels}", [n for n, _, _ in read],
                      [int(s["rank"]) for _, _, s in read])]
    if not worlds:
        return []
    world = worlds.pop()
    faults: list[Fault] = []
    seen: dict[int, str] = {}
    for name, by_name, shard in read:
        r = int(shard["rank"])
        if r != by_name or not 0 <= r < world or r in seen:
            also = f", as does {seen[r]}" if r in seen else ""
            faults.append(Fault(f"{name} records rank {r} of world size {world}{also}", [name], [r, by_name]))
        seen.setdefault(r, name)
    missing = sorted(set(range(world)) - set(seen) - unreadable)
    if missing:
        names = [SHARD_PATTERN.format(rank=r) for r in missing]
        labels = ", ".join(_label(n, r) for n, r in zip(names, missing, strict=True))
        faults.append(Fault(f"missing {labels}: the checkpoint was saved by {world} ranks and holds "
                            f"{world - len(missing)} of their {world} shards", names, missing))
    return faults


def _check_steps(read: Sequence[tuple[str, int, dict[str, Any]]]) -> list[Fault]:
    """Every shard saved at the same optimizer step."""
    steps: dict[int, list[str]] = {}
    for name, _, shard in read:
        steps.setdefault(int(shard["steps"]), []).append(_label(name, int(shard["rank"])))
    if len(steps) <= 1:
        return []
    labels = "; ".join(f"step {st}: {', '.join(ls)}" for st, ls in sorted(steps.items()))
    return [Fault(f"shards from different steps ({labels})", [n for n, _, _ in read],
                  [int(s["rank"]) for _, _, s in read])]


def _check_blocks(read: Sequence[tuple[str, int, dict[str, Any]]],
                  model_blocks: Mapping[str, Iterable[str]] | Iterable[str]) -> list[Fault]:
    """Every shard holds exactly the model's Fisher blocks (and, given, each block's factors); shards with the same
    mismatch are reported together."""
    factors = {k: list(v) for k, v in model_blocks.items()} if isinstance(model_blocks, Mapping) else None
    names = list(factors) if factors is not None else list(model_blocks)
    found: dict[str, list[tuple[str, int]]] = {}
    for name, _, shard in read:
        try:
            check_block_names(shard["blocks"], names)
            for block, want in (factors or {}).items():
                state = shard["blocks"][block]
                lacking = [f for f in want if not isinstance(state, dict) or f not in state]
                if lacking:
                    raise ValueError(f"checkpoint Fisher block {block} has no factor(s) {lacking}")
        except ValueError as err:
            found.setdefault(str(err), []).append((name, int(shard["rank"])))
    return [Fault(f"{', '.join(_label(n, r) for n, r in who)} do{'es' * (len(who) == 1)} not fit this model: {msg}",
                  [n for n, _ in who], [r for _, r in who]) for msg, who in found.items()]


# ---- merging and restoring ----------------------------------------------------------------------------------------
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

    It merges what it is given: whether the set is complete (every rank of one save, readable) is
    :func:`scan_shards`'s check, made before anything is loaded.

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


def pending_inversion(shards: Sequence[dict[str, Any]], rank: int, world: int) -> dict[str, Any] | None:
    """This rank's pending asynchronous inversion (``async_inverse``) from its own shard, when the shards come from
    the same world size (the owners' parts are per rank); else None, with a warning when one was pending (the saved
    preconditioners stay in use until the next inversion)."""
    mine = [s for s in shards if int(s.get("rank", -1)) == rank and int(s.get("world_size", -1)) == world]
    if mine:
        return mine[0].get("async_inversion")  # type: ignore[no-any-return]
    if any(s.get("async_inversion") for s in shards) and len(shards) > 1 and rank == 0:
        logger.warning("SP-NGD: the checkpoint holds an asynchronous inversion in flight from %d ranks; on %d ranks "
                       "it is dropped (the saved preconditioners stay until the next inversion step)",
                       len(shards), world)
    return None


def load_state(shards: Sequence[dict[str, Any]], blocks: Sequence[FisherBlock], ledger: SkipLedger,
               refresh: RefreshSchedule) -> int:
    """Restore blocks, skip counters and the refresh schedule from every rank's :func:`pack_state` (any world size,
    a set :func:`scan_shards` accepted); returns the step counter.

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
