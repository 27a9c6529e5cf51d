"""Rank worker of tests/integrations/test_decentralized.py: ``python tests/support/decentralized_worker.py OUT CASES``.

Each case (a JSON object) trains the tiny model :func:`build_model` through ``ds_spngd.initialize`` with a DecentLaM /
DmSGD config on this rank's own data (:func:`batch`: different on every rank) and records, into
``OUT/<name>.r<rank>.pt``: the parameters right after the engine was built (``init``), after every optimizer step
(``params``), the learning rate each step used (``lrs``) and, per case option, the consensus model and the
checkpoint round trip. Case keys: ``name``, ``type``, ``topology``, ``lr``, ``momentum``, ``weight_decay``, ``steps``,
``micro`` (micro-batch size), ``gas`` (gradient accumulation steps), ``scheduler`` (a DeepSpeed scheduler section or
null), ``bf16`` (DeepSpeed's bf16 section on), ``checkpoint`` (save after ``steps - 1`` steps, step, load, step
again), ``consensus`` (record :func:`consensus_parameters` after the last step).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
from torch import nn

IN, HID, OUT = 5, 4, 3
SEED = 1234


def build_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """The test model (same initial weights in every process)."""
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, OUT)).to(dtype)


def batch(rank: int, step: int, micro: int, size: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Rank ``rank``'s micro-batch ``micro`` of optimizer step ``step``: inputs (size, IN), targets (size, OUT);
    shifted and scaled per rank, so the local objectives differ (heterogeneous data)."""
    g = torch.Generator().manual_seed(10_000 * rank + 100 * step + micro + 7)
    x = torch.randn(size, IN, generator=g) + 0.5 * rank
    y = torch.randn(size, OUT, generator=g) * (1.0 + rank)
    return x.to(dtype), y.to(dtype)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error."""
    return ((out - y) ** 2).mean()


def ds_config(case: dict[str, Any], world: int) -> dict[str, Any]:
    """The DeepSpeed config of a case."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": case["micro"], "gradient_accumulation_steps": case["gas"],
        "train_batch_size": case["micro"] * case["gas"] * world, "zero_optimization": {"stage": 0},
        "steps_per_print": 10**9,
        "optimizer": {"type": case["type"], "params": {"lr": case["lr"], "momentum": case["momentum"],
                                                       "weight_decay": case["weight_decay"],
                                                       "topology": case["topology"]}},
    }  # fmt: skip
    if case.get("scheduler"):
        cfg["scheduler"] = case["scheduler"]
    if case.get("bf16"):
        cfg["bf16"] = {"enabled": True}
    return cfg


def flat(module: nn.Module) -> torch.Tensor:
    """The module's parameters as one fp32 vector (a copy)."""
    return torch.cat([p.detach().float().reshape(-1) for p in module.parameters()])


def train_step(engine: Any, case: dict[str, Any], rank: int, step: int) -> float:
    """One optimizer step (``gas`` micro-batches of forward, backward, engine.step); the lr the step used."""
    lr = float(engine.optimizer.param_groups[0]["lr"])
    for micro in range(case["gas"]):
        dtype = torch.bfloat16 if case.get("bf16") else torch.float32
        x, y = batch(rank, step, micro, case["micro"], dtype)
        engine.backward(loss_fn(engine(x).float(), y.float()))
        engine.step()
    return lr


def run_case(case: dict[str, Any], rank: int, world: int, out: str) -> dict[str, Any]:
    """Train one case and return this rank's record (see the module docstring)."""
    import ds_spngd
    from ds_spngd.integrations.deepspeed.decentralized_engine import consensus_parameters

    model = build_model()
    engine = ds_spngd.initialize(model=model, config=ds_config(case, world))[0]
    rec: dict[str, Any] = {"init": flat(engine.module), "params": [], "lrs": [],
                           "allreduce": bool(engine.enable_backward_allreduce)}  # fmt: skip
    steps = case["steps"] - 1 if case.get("checkpoint") else case["steps"]
    for step in range(steps):
        rec["lrs"].append(train_step(engine, case, rank, step))
        rec["params"].append(flat(engine.module))
    if case.get("checkpoint"):
        ckpt = os.path.join(out, f"ckpt_{case['name']}")
        engine.save_checkpoint(ckpt, tag="t")
        rec["lrs"].append(train_step(engine, case, rank, steps))
        rec["params"].append(flat(engine.module))
        engine.load_checkpoint(ckpt, tag="t")
        rec["loaded"] = flat(engine.module)
        train_step(engine, case, rank, steps)
        rec["resumed"] = flat(engine.module)
        rec["files"] = sorted(os.listdir(os.path.join(ckpt, "t")))
    if case.get("consensus"):
        with consensus_parameters(engine):
            rec["consensus"] = flat(engine.module)
        rec["after_consensus"] = flat(engine.module)
    return rec


def main(argv: list[str]) -> None:
    """``argv``: OUT (an existing directory) and CASES (a JSON list of cases)."""
    import deepspeed

    from tests.support.harness import teardown

    out, cases = argv[0], json.loads(argv[1])
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    for case in cases:
        torch.save(run_case(case, rank, world, out), os.path.join(out, f"{case['name']}.r{rank}.pt"))
    teardown()


if __name__ == "__main__":
    main(sys.argv[1:])
