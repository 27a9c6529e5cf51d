"""One gloo rank of tests/integrations/test_adaptive_warmup_engine.py: DeepSpeed runs with
``"scheduler": {"type": "AdaptiveWarmup"}`` through ``ds_spngd.initialize``, every rank on different data.

Run as (rank environment from tests/support/harness.rank_env)::

    python tests/support/adaptive_warmup_worker.py OUT CASES_JSON

Each case ``{"name", "optimizer": DeepSpeed optimizer section, "gas": gradient_accumulation_steps, "steps",
"scheduler": AdaptiveWarmup params, "resume_at": optional step, "extra": more top-level config keys}`` trains a
small tanh MLP regression (bounded loss, so a too-large LR raises the loss instead of overflowing) for ``steps``
optimizer steps, each rank on its own random batches. With ``resume_at`` the engine saves a checkpoint after that
step, a fresh engine (other initial weights) loads it and trains the rest. Per step the record holds the LR DeepSpeed
used, this rank's mean micro-batch loss and the mean over all ranks computed here by a separate all-reduce (what the
scheduler must have observed).

Records: ``OUT/<case name>.r<rank>.json`` with ``{"lrs", "local", "agreed", "observed_steps", "observed_losses",
"warmup_steps_found", "peak_lr", "max_warmup_steps", "last_test", "scheduler_type", "optimizer_class"}``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import ds_spngd
from tests.support.harness import teardown, write_json

MICRO = 8


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2), nn.Tanh())


def build(case: dict[str, Any], world: int, seed: int) -> Any:
    gas = int(case.get("gas", 1))
    config = {"train_batch_size": MICRO * gas * world, "train_micro_batch_size_per_gpu": MICRO,
              "gradient_accumulation_steps": gas, "gradient_clipping": 0.0, "zero_optimization": {"stage": 0},
              "optimizer": case["optimizer"], "steps_per_print": 10**9,
              "scheduler": {"type": "AdaptiveWarmup", "params": case["scheduler"]}, **case.get("extra", {})}
    model = make_model(seed)
    engine, _, _, _ = ds_spngd.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def batch(step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's micro-batch: different on every rank; a fixed smooth target."""
    gen = torch.Generator().manual_seed(10_000 * rank + 100 * step + micro)
    x = torch.randn(MICRO, 6, generator=gen)
    y = torch.stack([torch.sin(x[:, 0] + x[:, 1]), torch.cos(x[:, 2] * x[:, 3])], dim=1) * 0.8
    return x, y


def train(engine: Any, steps: range, rank: int, rec: dict[str, list[float]]) -> None:
    gas = engine.gradient_accumulation_steps()
    for step in steps:
        rec["lrs"].append(float(engine.get_lr()[0]))
        total = 0.0
        for micro in range(gas):
            x, y = batch(step, micro, rank)
            dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
            loss = nn.functional.mse_loss(engine(x.to(dtype)).float(), y)
            engine.backward(loss)
            total += float(loss)
            engine.step()
        both = torch.tensor([total / gas], dtype=torch.float64)
        dist.all_reduce(both)
        rec["local"].append(total / gas)
        rec["agreed"].append(float(both) / dist.get_world_size())


def run_case(case: dict[str, Any], out: str, rank: int, world: int) -> None:
    rec: dict[str, list[float]] = {"lrs": [], "local": [], "agreed": []}
    engine = build(case, world, seed=0)
    resume_at = case.get("resume_at")
    if resume_at is None:
        train(engine, range(case["steps"]), rank, rec)
    else:
        train(engine, range(resume_at), rank, rec)
        engine.save_checkpoint(os.path.join(out, f"ckpt_{case['name']}"), tag="mid")
        engine = build(case, world, seed=1)
        engine.load_checkpoint(os.path.join(out, f"ckpt_{case['name']}"), tag="mid")
        train(engine, range(resume_at, case["steps"]), rank, rec)
    sched = engine.lr_scheduler
    write_json(os.path.join(out, f"{case['name']}.r{rank}.json"), {
        **rec, "observed_steps": sched.steps, "observed_losses": sched.losses,
        "warmup_steps_found": sched.warmup_steps_found, "peak_lr": sched.peak_lr,
        "max_warmup_steps": sched.max_warmup_steps, "last_test": sched.last_test,
        "scheduler_type": type(sched).__name__, "optimizer_class": type(engine.basic_optimizer).__name__})


def main() -> None:
    out, cases = sys.argv[1], json.loads(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    for case in cases:
        run_case(case, out, rank, world)
    teardown()


if __name__ == "__main__":
    main()
