"""One data-parallel rank of SP-NGD through DeepSpeed on a chosen device and process-group backend.

Run as::

    RANK=r WORLD_SIZE=w LOCAL_RANK=l MASTER_ADDR=127.0.0.1 MASTER_PORT=p DS_ACCELERATOR=cpu|cuda \
        python tests/support/cuda_replicas_worker.py OUT_DIR CASES_JSON --device cpu|cuda --backend gloo|cuda:gloo|nccl

Used by tests/integrations/test_cuda.py for two ranks sharing one GPU over ``cuda:gloo`` (a process group with no CPU
backend: like NCCL it rejects CPU tensors, so any collective the library issues on a CPU tensor fails here as it would
on a multi-GPU NCCL job) and, on CPU over plain gloo, as the smoke test of this harness.

The process group is created here with ``torch.distributed.init_process_group(backend)`` *before* DeepSpeed is
touched; ``deepspeed.init_distributed`` then adopts it (DeepSpeed 0.19.8 ``deepspeed/comm/comm.py``
``init_distributed``: with ``cdb`` unset and ``torch.distributed.is_initialized()`` it wraps the existing group in a
``TorchBackend``, whose ``init_process_group`` (``deepspeed/comm/torch.py``) skips initialization when one exists).
The worker checks that the backend is still the requested one afterwards.

Each case (a JSON object) takes: ``steps``, ``zero`` (stage), ``mode`` (precondition_mode), ``kl_clip``,
``weight_rescale``; SP-NGD refreshes factors every step and inverts every 2nd. The global batch of every step is
fixed (seeded, generated on the CPU and moved to the device, so every device sees the same numbers); rank r takes
the r-th contiguous share. After every step all ranks all-gather their flattened parameters and rank 0 records
whether every rank's copy is bitwise identical to rank 0's (and the largest difference). Rank 0 writes
``OUT_DIR/<case index>.json``: ``{"params": steps × P (float lists), "loss": [...], "rank_equal": [...],
"rank_max_diff": [...], "backend": ..., "device": ...}``.
"""

from __future__ import annotations

import argparse
import json
import os

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator
from torch import nn

import ds_spngd
from tests.support.harness import strict_fp32, teardown, write_json

GLOBAL_BATCH = 24


def make_model() -> nn.Module:
    """conv → Linear → LayerNorm → Linear (Kronecker and unit-wise blocks, no BatchNorm: BatchNorm's batch
    statistics would depend on how the batch is split over ranks)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16),
                         nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 5))


def ds_config(case: dict, world: int) -> dict:
    """DeepSpeed config of one case: fp32, ZeRO ``case["zero"]``, SP-NGD with factor_update_steps=1,
    inv_update_steps=2, fp32 factor payloads (bit-comparable with the 1-rank run) and a linear LR warm-up."""
    return {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": case.get("zero", 0)},
        "optimizer": {"type": "SPNGD", "params": {
            "lr": 0.2, "momentum": 0.9, "damping": 0.03, "factor_decay": 0.5, "weight_decay": 1e-3,
            "factor_update_steps": 1, "inv_update_steps": 2, "inverse_method": "inverse",
            "precondition_mode": case.get("mode", "comm_opt"), "comm_dtype": "fp32",
            "kl_clip": case.get("kl_clip"), "weight_rescale": case.get("weight_rescale", False)}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.02, "warmup_max_lr": 0.2,
                                                      "warmup_num_steps": 4, "warmup_type": "linear"}},
    }


def run_case(case: dict, rank: int, world: int, device: torch.device) -> dict:
    """Train one case; returns rank 0's record (other ranks return {})."""
    model = make_model()
    engine, _, _, _ = ds_spngd.initialize(model=model, model_parameters=model.parameters(),
                                          config=ds_config(case, world))
    if torch.device(engine.device).type != device.type:
        raise RuntimeError(f"DeepSpeed put the model on {engine.device}, expected {device.type} "
                           "(set DS_ACCELERATOR for the worker)")
    gen = torch.Generator().manual_seed(1)
    share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    params, losses, equal, max_diff = [], [], [], []
    for _ in range(case["steps"]):
        x = torch.randn(GLOBAL_BATCH, 1, 6, 6, generator=gen)
        y = torch.randint(0, 5, (GLOBAL_BATCH,), generator=gen)
        xr, yr = x[share].to(device), y[share].to(device)
        loss = F.cross_entropy(engine(xr), yr)
        total = loss.detach().float().reshape(1) * yr.numel()  # on the device: cuda:gloo refuses CPU tensors
        engine.backward(loss)
        engine.step()
        dist.all_reduce(total)
        losses.append(float(total) / GLOBAL_BATCH)
        flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
        copies = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(copies, flat)
        equal.append(all(torch.equal(copies[0], c) for c in copies[1:]))
        max_diff.append(max((float((copies[0] - c).abs().max()) for c in copies[1:]), default=0.0))
        params.append(flat.cpu().tolist())
    if rank != 0:
        return {}
    return {"params": params, "loss": losses, "rank_equal": equal, "rank_max_diff": max_diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("cases")
    ap.add_argument("--device", choices=("cpu", "cuda"), required=True)
    ap.add_argument("--backend", choices=("gloo", "cuda:gloo", "nccl"), required=True)
    args = ap.parse_args()
    cases = json.loads(args.cases)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        strict_fp32()
    else:
        device = torch.device("cpu")
    accel = get_accelerator().device_name()
    if accel != args.device:
        raise RuntimeError(f"DeepSpeed's accelerator is {accel!r}, the worker was asked for {args.device!r}")
    dist.init_process_group(backend=args.backend)
    deepspeed.init_distributed(dist_backend=args.backend)  # adopts the group created above
    if str(dist.get_backend()) != args.backend:
        raise RuntimeError(f"process group backend is {dist.get_backend()!r}, expected {args.backend!r}")
    for i, case in enumerate(cases):
        record = run_case(case, rank, world, device)
        if rank == 0:
            record.update(backend=str(dist.get_backend()), device=str(device), world=world)
            write_json(os.path.join(args.out, f"{i}.json"), record)
    teardown()


if __name__ == "__main__":
    main()
