"""One case on one rank: the fixed batches, the micro-batch loop through the engine, faults, records.

The global batch of every step is fixed (seeded generator, drawn even for an omitted step); rank r takes the r-th
contiguous share and splits it into ``gas`` micro-batches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tests.support.worker.case import Case
from tests.support.worker.engine import build, spngd_of
from tests.support.worker.faults import arm_grad_fault, arm_inversion_fault, device_slip, scale_for
from tests.support.worker.net import GLOBAL_BATCH, Net
from tests.support.worker.recording import (
    COLLECTIVES,
    RankRecord,
    count_collectives,
    new_record,
    record_error,
    record_final,
    record_step,
)
from tests.support.worker.resume import checkpoint_dir, restart


@dataclass
class Run:
    """A case in progress on one rank (``engine`` and ``model`` are replaced on a resume).

    Attributes:
        probe: the default device while the library runs ("meta" for :attr:`Case.meta`, else "cpu").
        directory: the shared checkpoint directory of a resume case.
    """

    case: Case
    rank: int
    world: int
    engine: Any
    model: nn.Module
    record: RankRecord
    generator: torch.Generator
    probe: str
    directory: str | None


def run_case(case: Case, rank: int, world: int) -> RankRecord:
    """Run ``case`` on this rank; its record (a step's error is recorded, the case stops there)."""
    if case.canary:
        with device_slip():
            return run_case(dataclasses.replace(case, canary=False), rank, world)
    if case.count_collectives:
        count_collectives()
    engine, model = build(case, world, rank)
    COLLECTIVES.clear()
    run = Run(case, rank, world, engine, model, new_record(), torch.Generator(device="cpu").manual_seed(1),
              "meta" if case.meta else "cpu", None)
    run.directory = checkpoint_dir(case, rank)
    torch.set_default_device(run.probe)
    step = 0
    try:
        for step in range(case.steps):
            run_step(run, step)
    except Exception as err:  # noqa: BLE001 - recorded for the test: every rank must stop the same way
        record_error(run.record, err, step, run.model)
    finally:
        torch.set_default_device("cpu")
    record_final(run.record, run.engine, run.model, case)
    return run.record


def run_step(run: Run, step: int) -> None:
    """One optimizer step (a resume first, at ``resume_at``), recorded; an omitted step records without running."""
    case, rank = run.case, run.rank
    if step == case.resume_at:
        assert run.directory is not None
        run.engine, run.model = restart(run.engine, case, run.world, rank, run.directory, run.probe)
    if isinstance(run.model, Net):
        run.model.step = step
    arm_inversion_fault(spngd_of(run.engine), case, rank, step)
    x = torch.randn(GLOBAL_BATCH, 1, 6, 6, generator=run.generator, device="cpu")
    y = torch.randint(0, 5, (GLOBAL_BATCH,), generator=run.generator, device="cpu")
    share = slice(rank * GLOBAL_BATCH // run.world, (rank + 1) * GLOBAL_BATCH // run.world)
    if step in case.omit:  # the reference of a skipped step: this batch never happened
        record_step(run.record, run.engine, run.model, float("nan"))
        return
    xs = x[share] * scale_for(case, rank, step)
    handles = arm_grad_fault(run.model, case, rank, step)
    total = accumulate(run, xs, y[share])
    for h in handles:
        h.remove()
    dist.all_reduce(total)
    record_step(run.record, run.engine, run.model, float(total) / GLOBAL_BATCH)


def accumulate(run: Run, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Forward, backward and engine.step() over this rank's ``gas`` micro-batches; the summed loss × examples."""
    case, engine = run.case, run.engine
    dtype = torch.bfloat16 if case.bf16 else torch.float32
    total = torch.zeros(1, device="cpu")
    for xm, ym in zip(xs.chunk(case.gas), ys.chunk(case.gas), strict=True):
        loss = F.cross_entropy(engine(xm.to(dtype)).float(), ym)
        total += loss.detach() * ym.numel()
        engine.backward(loss)
        if case.zero == 0 and engine.is_gradient_accumulation_boundary():
            run.record["grads_finite"].append(all(bool(torch.isfinite(q.grad).all())
                                                  for q in run.model.parameters() if q.grad is not None))
        engine.step()
    return total
