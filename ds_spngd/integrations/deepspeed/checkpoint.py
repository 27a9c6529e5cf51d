"""SP-NGD's per-rank checkpoint shards next to DeepSpeed's checkpoint files.

DeepSpeed saves ``optimizer.state_dict()`` only from data-parallel rank 0 at ZeRO stage 0 (and ``client_state`` goes
into that one file), so K-FAC state owned by other ranks would be lost. Every rank therefore also writes its own shard
(:meth:`ds_spngd.SPNGD.spngd_state`, file :data:`ds_spngd.checkpoint.SHARD_PATTERN`) into the tag directory DeepSpeed
writes, and on load every rank reads all shards of the tag (:meth:`ds_spngd.SPNGD.load_sharded_state`), at every
stage.

Seam: none; DeepSpeed 0.19.8 has no save / load callback and no per-rank file of the client's. The glue wraps
``engine.save_checkpoint`` and ``engine.load_checkpoint`` on the instance (:data:`.patches.PATCHES`
``engine.save_checkpoint``, ``engine.load_checkpoint``: the signatures, DeepSpeed's default tag
``global_step<N>``, and ``load_checkpoint`` returning ``(load_path, client_state)``).
"""

from __future__ import annotations

import glob
import inspect
import os
from collections.abc import Callable
from typing import Any

import torch

from ds_spngd.checkpoint import SHARD_PATTERN
from ds_spngd.comm.collectives import rank
from ds_spngd.optimizer import SPNGD

__all__ = ["attach_checkpoint"]


def attach_checkpoint(engine: Any, spngd: SPNGD, on_load: Callable[[], None] | None = None) -> None:
    """Wrap ``engine.save_checkpoint`` / ``engine.load_checkpoint`` so every rank also writes / reads SP-NGD's shards.

    Args:
        engine: the DeepSpeed engine built with ``spngd``.
        spngd: the SP-NGD optimizer.
        on_load: called after SP-NGD's state was loaded (the ZeRO glue re-links its optimizer-state fragments).

    Raises (from the wrapped ``load_checkpoint``):
        FileNotFoundError: the loaded tag directory holds no SP-NGD shard (not saved through ``ds_spngd.initialize``).
    """
    orig_save, orig_load = engine.save_checkpoint, engine.load_checkpoint

    def save_checkpoint(save_dir: str, tag: Any = None, *a: Any, **k: Any) -> Any:
        out = orig_save(save_dir, tag, *a, **k)
        tag_dir = os.path.join(save_dir, str(tag if tag is not None else f"global_step{engine.global_steps}"))
        os.makedirs(tag_dir, exist_ok=True)
        torch.save(spngd.spngd_state(), os.path.join(tag_dir, SHARD_PATTERN.format(rank=rank())))
        _barrier()
        return out

    def load_checkpoint(load_dir: str, tag: Any = None, *a: Any, **k: Any) -> Any:
        out = orig_load(load_dir, tag, *a, **k)
        path = out[0] if isinstance(out, tuple) else None
        wanted = inspect.signature(orig_load).bind(load_dir, tag, *a, **k).arguments.get("load_optimizer_states", True)
        if path is None or not wanted:
            return out
        _load_shards(spngd, os.path.dirname(path) if os.path.isfile(path) else path)
        if on_load is not None:
            on_load()
        return out

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint


def _load_shards(spngd: SPNGD, tag_dir: str) -> None:
    head, tail = SHARD_PATTERN.split("{")[0], SHARD_PATTERN.split("}")[-1]  # "spngd_rank", ".pt"
    files = sorted(glob.glob(os.path.join(tag_dir, f"{head}*{tail}")))
    if not files:
        raise FileNotFoundError(f"checkpoint {tag_dir} has no SP-NGD shards (spngd_rank*.pt); it was not saved "
                                "through ds_spngd.initialize's engine")
    # read onto the CPU (the shards may come from other devices); load_sharded_state moves every tensor to its
    # block's device
    spngd.load_sharded_state([torch.load(f, map_location="cpu", weights_only=False) for f in files])


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
