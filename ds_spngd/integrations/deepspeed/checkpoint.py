"""SP-NGD's per-rank checkpoint shards next to DeepSpeed's checkpoint files, loaded only whole and on every rank
together.

DeepSpeed saves ``optimizer.state_dict()`` only from data-parallel rank 0 at ZeRO stage 0 (and ``client_state`` goes
into that one file), so K-FAC state owned by other ranks would be lost. Every rank therefore also writes its own shard
(:meth:`ds_spngd.SPNGD.spngd_state`, file :data:`ds_spngd.checkpoint.SHARD_PATTERN`, written atomically by
:func:`ds_spngd.checkpoint.save_shard`: a crash mid-save never leaves a truncated shard under the real name) into
the tag directory DeepSpeed writes, and on load every rank reads all shards of the tag
(:meth:`ds_spngd.SPNGD.load_sharded_state`), at every stage. Shards of ranks ≥ the world size left in the tag
directory by an earlier save of the same tag are removed; a rank that cannot write its shard makes every rank raise.

Loading refuses, on **every** rank with the same :class:`ds_spngd.checkpoint.SPNGDCheckpointError` naming the tag
directory, the shard files and their ranks, a shard set that is missing a shard, holds an unreadable one, mixes saves
(world sizes, steps) or belongs to another model (:func:`ds_spngd.checkpoint.scan_shards`; a missing tag directory
or one without any shard: :class:`ds_spngd.checkpoint.SPNGDCheckpointNotFoundError`, also a FileNotFoundError):
merging an incomplete set would silently drop the state the missing ranks owned. A complete set saved by another
world size is merged and loaded. Order of a load:

1. resolve the tag as DeepSpeed does (``tag=None``: the ``latest`` file, ``latest_universal`` for universal
   checkpoints; neither present on any rank: DeepSpeed's own "nothing loaded" answer, ``(None, None)``);
2. every rank reads and checks all shards;
3. the ranks agree through one MAX all-reduce of a small flag over the default process group (every rank reaches it,
   whatever it found); when any rank found a fault (or the ranks disagree on whether a tag exists) every rank gathers
   the short fault lists (``all_gather_object``) and raises the same error, listing what each rank found;
4. only then DeepSpeed's own ``load_checkpoint`` runs (at stage 0 it already calls SP-NGD's ``load_state_dict``
   with data-parallel rank 0's shard), then the shards read in step 2 are applied, then ``on_load``.

So a refused load modifies neither DeepSpeed's nor SP-NGD's state. ``load_optimizer_states=False`` skips SP-NGD's
shards entirely (no check, no load), as before.

Seam: none; DeepSpeed 0.19.8 has no save / load callback and no per-rank file of the client's. The glue wraps
``engine.save_checkpoint`` and ``engine.load_checkpoint`` on the instance (:data:`.patches.PATCHES`
``engine.save_checkpoint``, ``engine.load_checkpoint``: the signatures, DeepSpeed's default tag
``global_step<N>``, and ``load_checkpoint`` returning ``(load_path, client_state)``); the tag resolution mirrors
the start of ``DeepSpeedEngine.load_checkpoint`` (the ``latest`` / ``latest_universal`` file).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ds_spngd.checkpoint import (
    SHARD_PATTERN,
    Fault,
    ShardScan,
    checkpoint_error,
    remove_stale_shards,
    save_shard,
    scan_shards,
)
from ds_spngd.comm.collectives import backend, rank, world_size
from ds_spngd.optimizer import SPNGD

__all__ = ["agree_faults", "attach_checkpoint", "resolve_tag"]

Reports = list[tuple[int | None, str, list[Fault]]]


def attach_checkpoint(engine: Any, spngd: SPNGD, on_load: Callable[[], None] | None = None) -> None:
    """Wrap ``engine.save_checkpoint`` / ``engine.load_checkpoint`` so every rank also writes / reads SP-NGD's shards
    (see the module docstring).

    Args:
        engine: the DeepSpeed engine built with ``spngd``.
        spngd: the SP-NGD optimizer.
        on_load: called after SP-NGD's state was loaded (the ZeRO glue re-links its optimizer-state fragments).

    Raises (on every rank together):
        SPNGDCheckpointError: from ``save_checkpoint``, some rank could not write its shard; from ``load_checkpoint``,
            the tag's shard set is incomplete, unreadable, mixed or from another model (nothing was loaded).
        SPNGDCheckpointNotFoundError: from ``load_checkpoint``, the tag directory does not exist or holds no SP-NGD
            shard (not saved through ``ds_spngd.initialize``'s engine).
    """
    orig_save, orig_load = engine.save_checkpoint, engine.load_checkpoint

    def save_checkpoint(save_dir: str, tag: Any = None, *a: Any, **k: Any) -> Any:
        out = orig_save(save_dir, tag, *a, **k)
        tag_dir = os.path.join(save_dir, str(tag if tag is not None else f"global_step{engine.global_steps}"))
        _save_shard(spngd, tag_dir)
        return out

    def load_checkpoint(load_dir: str, tag: Any = None, *a: Any, **k: Any) -> Any:
        bound = inspect.signature(orig_load).bind(load_dir, tag, *a, **k)
        if not bound.arguments.get("load_optimizer_states", True):
            return orig_load(*bound.args, **bound.kwargs)
        tag = resolve_tag(engine, load_dir, tag)
        scan = _check_shards(spngd, load_dir, tag)  # raises on every rank together
        if scan is None:  # no tag on any rank: DeepSpeed warns and answers (None, None)
            return orig_load(*bound.args, **bound.kwargs)
        bound.arguments["tag"] = tag  # the tag checked is the tag DeepSpeed loads
        out = orig_load(*bound.args, **bound.kwargs)
        if (out[0] if isinstance(out, tuple) else None) is None:
            return out
        spngd.load_sharded_state(scan.shards)
        if on_load is not None:
            on_load()
        return out

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint


def resolve_tag(engine: Any, load_dir: str, tag: Any) -> Any:
    """The tag ``engine.load_checkpoint(load_dir, tag)`` loads: ``tag`` itself, or with ``tag=None`` the content of
    ``load_dir/latest`` (``latest_universal`` when the engine loads universal checkpoints); None when that file does
    not exist (DeepSpeed then loads nothing)."""
    if tag is not None:
        return tag
    universal = getattr(engine, "load_universal_checkpoint", None)
    latest = os.path.join(load_dir, "latest_universal" if callable(universal) and universal() else "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest, encoding="utf-8") as fd:
        return fd.read().strip()


def _save_shard(spngd: SPNGD, tag_dir: str) -> None:
    """Write this rank's shard atomically (rank 0 first removes stale shards of ranks ≥ the world size); the ranks
    agree, in place of a barrier, on whether every shard was written."""
    me = rank()
    faults: list[Fault] = []
    try:
        os.makedirs(tag_dir, exist_ok=True)
        state = spngd.spngd_state()
        if me == 0:
            remove_stale_shards(tag_dir, int(state["world_size"]))
        save_shard(state, tag_dir, me)
    except Exception as err:  # noqa: BLE001 - every rank must learn of it, or the others would hang or load half
        name = SHARD_PATTERN.format(rank=me)
        faults.append(Fault(f"rank {me} could not write {name}: {type(err).__name__}: {err}", [name], [me]))
    reports = agree_faults(faults, tag_dir, _flag_device(spngd))
    if reports:
        raise checkpoint_error(tag_dir, reports, "not saved completely",
                               "this tag's SP-NGD shard set is incomplete and will be refused on load; save again")


def _check_shards(spngd: SPNGD, load_dir: str, tag: Any) -> ShardScan | None:
    """Read and check the tag's shards on this rank, then agree with every rank; the scan (None: no rank has a tag).

    Raises:
        SPNGDCheckpointError: on every rank, when any rank found a fault or the ranks disagree on the tag's existence.
    """
    tag_dir = os.path.join(load_dir, str(tag)) if tag is not None else load_dir
    scan = None
    if tag is not None:
        scan = scan_shards(tag_dir, {b.name: [f.name for f in b.factors] for b in spngd.blocks})
    reports = agree_faults(scan.faults if scan is not None else [], tag_dir, _flag_device(spngd), tag is not None)
    if reports:
        raise checkpoint_error(tag_dir, reports)
    return scan


def _flag_device(spngd: SPNGD) -> torch.device:
    """Where the agreement's flag lives: the CPU, or SP-NGD's device when the default group is NCCL's."""
    return spngd.device if "nccl" in backend() else torch.device("cpu")


def agree_faults(faults: list[Fault], tag_dir: str, device: torch.device, tagged: bool | None = None) -> Reports:
    """Every rank's faults, [] when no rank found one: one MAX all-reduce of ``[fault here, no tag here, a tag here]``
    over the default group, reached by every rank; only when a fault (or a disagreement on ``tagged``) shows, the
    ranks gather their ``(rank, tag dir, faults)`` (``all_gather_object``, a few hundred bytes)."""
    me = rank()
    if world_size() == 1:
        return [(None, tag_dir, faults)] if faults else []
    flags = torch.tensor([float(bool(faults)), float(tagged is False), float(tagged is True)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    found, no_tag, a_tag = (bool(v > 0) for v in flags.tolist())
    if no_tag and a_tag:  # the same on every rank: all add their view and gather
        view = "found no `latest` file" if tagged is False else f"loads {tag_dir}"
        faults = [*faults, Fault(f"the ranks disagree on the tag: this rank {view}", [], [me])]
    if not (found or (no_tag and a_tag)):
        return []
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, (tag_dir, faults))
    return [(r, where, fs) for r, (where, fs) in enumerate(gathered) if fs]
