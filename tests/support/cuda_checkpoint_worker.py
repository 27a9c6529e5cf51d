"""Checkpoint save → fresh engine → load → continuation, on one rank of a chosen device/backend (used by
tests/integrations/test_cuda.py on CUDA/NCCL; runs on CPU/gloo as well).

Run as::

    RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=p DS_ACCELERATOR=cpu|cuda \
        python tests/support/cuda_checkpoint_worker.py RESULT_JSON CKPT_DIR CASES_JSON \
            --device cpu|cuda --backend gloo|nccl

Per case (``{"zero": stage, "steps": N, "save_at": K}``), on the same fixed batches (batch i is generated from seed
1000 + i on the CPU, so it does not depend on where a run starts):

* **uninterrupted**: a fresh engine trains N steps;
* **resumed**: a fresh engine trains K steps and ``save_checkpoint``s; then a *new* engine (built from a model with
  different initial weights) ``load_checkpoint``s and trains steps K … N−1;
* **control**: a new engine loads the same checkpoint with ``load_optimizer_states=False`` and
  ``load_lr_scheduler_states=False`` (weights only) and trains steps K … N−1: the run a broken resume would give.

SP-NGD refreshes factors every step and inverts every 2nd; K is odd, so the first step after the resume uses the
preconditioner saved with the checkpoint (one step older than the factors), which a resume must not rebuild.
On CUDA, TF32 is off and deterministic kernels are on (tests/support/harness.py ``strict_fp32``).

RESULT_JSON: per case ``{"uninterrupted": N × P, "resumed": (N−K) × P, "control": (N−K) × P,
"loaded_differences": [...] (loaded SP-NGD state vs the state at save time, exact), "devices": {...} (where the
loaded SP-NGD tensors live, recorded right after load_checkpoint), "engine_device": ...}``. It is rewritten after each
phase, so a crash in the continuation still leaves the load-time findings.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import ds_spngd
from tests.support.harness import snapshot, state_devices, state_differences, strict_fp32, teardown, write_json

BATCH = 32


def make_model(seed: int) -> nn.Module:
    """conv → BatchNorm → Linear → LayerNorm → Linear: Kronecker and both unit-wise kinds, and BN buffers."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 8 * 8, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 10))


def ds_config(zero: int) -> dict[str, Any]:
    """fp32, ZeRO ``zero``; SP-NGD with every partitioned code path on (KL-clip, weight rescaling); a WarmupLR
    schedule whose position must survive the checkpoint."""
    return {
        "train_batch_size": BATCH, "train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero},
        "optimizer": {"type": "SPNGD", "params": {
            "lr": 0.1, "momentum": 0.9, "damping": 0.03, "factor_decay": 0.5, "weight_decay": 1e-3,
            "factor_update_steps": 1, "inv_update_steps": 2, "comm_dtype": "fp32", "kl_clip": 0.05,
            "weight_rescale": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.01, "warmup_max_lr": 0.1,
                                                      "warmup_num_steps": 6, "warmup_type": "linear"}},
    }


def batch(i: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + i)
    return (torch.randn(BATCH, 1, 8, 8, generator=gen).to(device),
            torch.randint(0, 10, (BATCH,), generator=gen).to(device))


def build(zero: int, seed: int) -> tuple[Any, nn.Module]:
    model = make_model(seed)
    engine, _, _, _ = ds_spngd.initialize(model=model, model_parameters=model.parameters(), config=ds_config(zero))
    return engine, model


def train(engine: Any, model: nn.Module, steps: range, device: torch.device) -> list[list[float]]:
    """Run the given optimizer steps; the model's flattened parameters after each."""
    out = []
    for i in steps:
        x, y = batch(i, device)
        engine.backward(F.cross_entropy(engine(x), y))
        engine.step()
        out.append(torch.cat([p.detach().float().reshape(-1) for p in model.parameters()]).cpu().tolist())
    return out


def spngd_of(engine: Any) -> Any:
    spngd = ds_spngd.get_spngd(engine)
    if spngd is None:
        raise RuntimeError("no SP-NGD optimizer behind the engine")
    return spngd


def master_params(engine: Any, model: nn.Module) -> list[torch.Tensor]:
    """Model parameters plus the optimizer's own (fp32 master / ZeRO partition) parameters."""
    return list(model.parameters()) + [p for g in spngd_of(engine).param_groups for p in g["params"]]


def run_case(case: dict[str, int], ckpt: str, device: torch.device, record: dict[str, Any],
             flush: Any) -> None:
    zero, n, k = case["zero"], case["steps"], case["save_at"]
    engine, model = build(zero, seed=0)
    record["uninterrupted"] = train(engine, model, range(n), device)
    record["engine_device"] = str(engine.device)
    del engine, model

    engine, model = build(zero, seed=0)
    train(engine, model, range(k), device)
    at_save = snapshot(spngd_of(engine), master_params(engine, model))
    engine.save_checkpoint(ckpt, tag="k")
    del engine, model

    engine, model = build(zero, seed=1)  # other initial weights: the checkpoint must overwrite them
    engine.load_checkpoint(ckpt, tag="k")
    record["devices"] = state_devices(spngd_of(engine))
    record["loaded_differences"] = state_differences(at_save, snapshot(spngd_of(engine),
                                                                       master_params(engine, model)))
    flush()
    record["resumed"] = train(engine, model, range(k, n), device)
    flush()
    del engine, model

    engine, model = build(zero, seed=1)
    engine.load_checkpoint(ckpt, tag="k", load_optimizer_states=False, load_lr_scheduler_states=False)
    record["control"] = train(engine, model, range(k, n), device)
    flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("result")
    ap.add_argument("ckpt")
    ap.add_argument("cases")
    ap.add_argument("--device", choices=("cpu", "cuda"), required=True)
    ap.add_argument("--backend", choices=("gloo", "nccl"), required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.device == "cuda":
        torch.cuda.set_device(0)
        strict_fp32()
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    deepspeed.init_distributed(dist_backend=args.backend)
    if str(dist.get_backend()) != args.backend:
        raise RuntimeError(f"process group backend is {dist.get_backend()!r}, expected {args.backend!r}")
    cases = json.loads(args.cases)
    records: dict[str, dict[str, Any]] = {name: {} for name in cases}

    def flush() -> None:
        write_json(args.result, records)

    for name, case in cases.items():
        run_case(case, os.path.join(args.ckpt, name), device, records[name], flush)
        flush()
    teardown()


if __name__ == "__main__":
    main()
