"""Checkpoint resume (:attr:`Case.resume_at`): save, build a fresh engine as after a restart, load, continue."""

from __future__ import annotations

import tempfile
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tests.support.worker.case import Case
from tests.support.worker.engine import build


def checkpoint_dir(case: Case, rank: int) -> str | None:
    """The checkpoint directory of a resume case, made by rank 0 and shared with every rank (a broadcast); None for
    a case that does not resume."""
    if case.resume_at is None:
        return None
    holder = [tempfile.mkdtemp(prefix="spngd_ckpt_") if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def restart(engine: Any, case: Case, world: int, rank: int, directory: str, probe: str) -> tuple[Any, nn.Module]:
    """Save ``engine`` to ``directory``, build a fresh (engine, model) — the user's model on the CPU — and load the
    checkpoint into it under the default device ``probe`` (the library loads and steps under the probe)."""
    engine.save_checkpoint(directory, tag="k")
    torch.set_default_device("cpu")
    engine, model = build(case, world, rank)
    torch.set_default_device(probe)
    engine.load_checkpoint(directory, tag="k")
    return engine, model
