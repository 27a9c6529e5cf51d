"""fp16 + ZeRO-2 on CUDA with NCCL, world size 1 (used by tests/integrations/test_cuda.py).

Run as::

    RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=p \
        python tests/support/cuda_fp16_worker.py RESULT_JSON

Trains the same 6 batches twice: fp32 at ZeRO 0, and fp16 (dynamic loss scale from 2^12) at ZeRO 2, where before
batch 3 one extra step is taken whose loss is multiplied by Inf. Records, for tests/integrations/test_cuda.py to assert:
the two loss trajectories; DeepSpeed's skipped-step count around the Inf step; the exact differences of SP-NGD's
state (factors, preconditioners, momentum, counter, fp16 parameters and fp32 master partition) across it; where
SP-NGD's tensors live. fp16 factors are built from loss-scaled gradients that the hooks unscale, so the trajectory
follows fp32's up to fp16 rounding.
"""

from __future__ import annotations

import sys
from typing import Any

import deepspeed
import torch
import torch.nn.functional as F
from torch import nn

import ds_spngd
from tests.support.harness import snapshot, state_devices, state_differences, teardown, write_json


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 32),
                         nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 10))


def config(fp16: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_batch_size": 64, "train_micro_batch_size_per_gpu": 64, "gradient_clipping": 0,
        "zero_optimization": {"stage": 2 if fp16 else 0},
        "optimizer": {"type": "SPNGD", "params": {"lr": 0.05, "momentum": 0.9, "damping": 0.1, "factor_decay": 0.5,
                                                  "factor_update_steps": 1, "inv_update_steps": 1,
                                                  "comm_dtype": "fp32"}}}
    if fp16:
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 12, "loss_scale_window": 1000}
    return cfg


def main() -> None:
    result_path = sys.argv[1]
    torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="nccl")
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen))
               for _ in range(6)]
    record: dict[str, Any] = {}
    for fp16 in (False, True):
        model = make_model().cuda()
        engine, _, _, _ = ds_spngd.initialize(model=model, model_parameters=model.parameters(), config=config(fp16))
        spngd = ds_spngd.get_spngd(engine)
        assert spngd is not None
        dtype = torch.half if fp16 else torch.float32
        params = list(model.parameters()) + [p for g in spngd.param_groups for p in g["params"]]  # + fp32 master
        losses = []
        for i, (x, y) in enumerate(batches):
            if fp16 and i == 3:  # inject an overflow: DeepSpeed must skip the step, SP-NGD must not move
                before, skipped = snapshot(spngd, params), int(engine.skipped_steps)
                loss = F.cross_entropy(engine(x.cuda().to(dtype)).float(), y.cuda()) * float("inf")
                engine.backward(loss)
                engine.step()
                record["overflow"] = {"skipped_before": skipped, "skipped_after": int(engine.skipped_steps),
                                      "differences": state_differences(before, snapshot(spngd, params))}
            loss = F.cross_entropy(engine(x.cuda().to(dtype)).float(), y.cuda())
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        record["fp16" if fp16 else "fp32"] = {"loss": losses, "spngd_steps": int(spngd.steps),
                                              "skipped_steps": int(engine.skipped_steps),
                                              "devices": state_devices(spngd)}
        write_json(result_path, record)
    teardown()


if __name__ == "__main__":
    main()
