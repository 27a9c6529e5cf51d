"""One data-parallel rank of a tiny SP-NGD run through the real DeepSpeed engine (used by test_distributed.py).

Run as: RANK=r WORLD_SIZE=w LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/dist_worker.py OUT CASES_JSON
Each case is {"gas": int, "bf16": bool, "inverse_method": str, "steps": int} plus optional "damping", "skip",
"fisher_type", "zero" (stage), "mode" (precondition_mode), "comm_dtype", "overlap", "bucket_cap_mb", "resume_at"
(save a checkpoint after that many steps, build a fresh engine, load it and continue).
The global batch of every step is fixed (seeded); rank r takes the r-th contiguous share and splits it into gas
micro-batches. Rank 0 saves, per step, the model's parameters (fp32 view) and the global mean loss to
OUT/<case index>.pt as {"params": steps × P, "loss": steps}; every rank writes its SP-NGD stats to OUT/<i>.r<rank>.pt.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import ds_spngd

GLOBAL_BATCH = 24


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16),
                         nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 5))


def build(case: dict, world: int):
    gas = case["gas"]
    micro = GLOBAL_BATCH // (world * gas)
    config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "zero_optimization": {"stage": case.get("zero", 0)},
        "optimizer": {"type": "SPNGD", "params": {
            "lr": 0.2, "momentum": 0.9, "damping": case.get("damping", 0.03), "factor_decay": 0.5, "weight_decay": 1e-3,
            "factor_update_steps": 1, "inv_update_steps": 2, "inverse_method": case["inverse_method"],
            "fisher_type": case.get("fisher_type", "emp"), "skip_modules": case.get("skip", []),
            "precondition_mode": case.get("mode", "comm_opt"), "comm_dtype": case.get("comm_dtype", "fp32"),
            "overlap_comm": case.get("overlap", True), "bucket_cap_mb": case.get("bucket_cap_mb", 4.0),
            "kl_clip": case.get("kl_clip"), "weight_rescale": case.get("weight_rescale", False)}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.02, "warmup_max_lr": 0.2,
                                                      "warmup_num_steps": 4, "warmup_type": "linear"}},
    }
    if case["bf16"]:
        config["bf16"] = {"enabled": True}
    model = make_model()
    engine, _, _, _ = ds_spngd.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine, model


def run_case(case: dict, rank: int, world: int) -> tuple[list[torch.Tensor], list[float], list[dict]]:
    gas = case["gas"]
    engine, model = build(case, world)
    dtype = torch.bfloat16 if case["bf16"] else torch.float32
    gen = torch.Generator().manual_seed(1)
    history, losses, stats = [], [], []
    ckpt = tempfile.mkdtemp(prefix="spngd_ckpt_") if rank == 0 else None
    for step in range(case["steps"]):
        if step == case.get("resume_at"):
            holder = [ckpt]
            dist.broadcast_object_list(holder, src=0)
            engine.save_checkpoint(holder[0], tag="k")
            engine, model = build(case, world)  # a fresh engine, as after a restart
            engine.load_checkpoint(holder[0], tag="k")
        x = torch.randn(GLOBAL_BATCH, 1, 6, 6, generator=gen)
        y = torch.randint(0, 5, (GLOBAL_BATCH,), generator=gen)
        share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        total = torch.zeros(1)
        for xm, ym in zip(x[share].chunk(gas), y[share].chunk(gas), strict=True):
            loss = F.cross_entropy(engine(xm.to(dtype)).float(), ym)
            total += loss.detach() * ym.numel()
            engine.backward(loss)
            engine.step()
        dist.all_reduce(total)
        losses.append(float(total) / GLOBAL_BATCH)
        history.append(torch.cat([p.detach().float().reshape(-1) for p in model.parameters()]))
        spngd = ds_spngd.get_spngd(engine)
        assert spngd is not None
        stats.append(dict(spngd.last_stats))
    return history, losses, stats


def main() -> None:
    out, cases = sys.argv[1], json.loads(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    for i, case in enumerate(cases):
        history, losses, stats = run_case(case, rank, world)
        if rank == 0:
            torch.save({"params": torch.stack(history), "loss": torch.tensor(losses, dtype=torch.float64)},
                       os.path.join(out, f"{i}.pt"))
        torch.save(stats, os.path.join(out, f"{i}.r{rank}.pt"))
    # an explicit teardown: leaving the process group to interpreter exit sometimes aborted the process
    # ("terminate called without an active exception", SIGABRT) after all results were written
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
