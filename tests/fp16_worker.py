"""fp16 + ZeRO-2 on CUDA with NCCL, world size 1 (used by test_fp16_cuda.py; needs a GPU).

Checks, with asserts: (1) SP-NGD under fp16 ZeRO-2 follows the fp32 stage-0 run on the same batches (factors are
built from loss-scaled gradients and unscaled in the hooks); (2) a step whose gradients overflow is skipped by
DeepSpeed and leaves SP-NGD's factors, preconditioners, momentum, counters and the parameters exactly as they were;
(3) training continues afterwards. Prints "FP16 OK" and the measured deviation at the end.
"""

from __future__ import annotations

import copy

import deepspeed
import torch
import torch.nn.functional as F
from torch import nn

import ds_spngd


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 32),
                         nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 10))


def config(fp16: bool) -> dict:
    cfg = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 64, "gradient_clipping": 0,
           "zero_optimization": {"stage": 2 if fp16 else 0},
           "optimizer": {"type": "SPNGD", "params": {"lr": 0.05, "momentum": 0.9, "damping": 0.1,
                                                     "factor_decay": 0.5, "factor_update_steps": 1,
                                                     "inv_update_steps": 1, "comm_dtype": "fp32"}}}
    if fp16:
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 12, "loss_scale_window": 1000}
    return cfg


def snapshot(engine, model) -> dict:
    spngd = ds_spngd.get_spngd(engine)
    return {"params": [p.detach().float().clone() for p in model.parameters()],
            "factors": {f.name: (None if f.value is None else f.value.clone(), f.version)
                        for b in spngd.blocks for f in b.factors},
            "inverses": {b.name: [t.clone() for t in b.preconditioner_tensors()] for b in spngd.blocks},
            "state": copy.deepcopy({k: v for k, v in spngd.state.items()}), "steps": spngd.steps}


def equal(a: dict, b: dict) -> bool:
    same = all(torch.equal(x, y) for x, y in zip(a["params"], b["params"], strict=True))
    same &= all(torch.equal(a["factors"][k][0], b["factors"][k][0]) and a["factors"][k][1] == b["factors"][k][1]
                for k in a["factors"])
    same &= all(torch.equal(x, y) for k in a["inverses"] for x, y in zip(a["inverses"][k], b["inverses"][k],
                                                                          strict=True))
    sa, sb = list(a["state"].values()), list(b["state"].values())
    same &= all(torch.equal(x["momentum_buffer"], y["momentum_buffer"]) for x, y in zip(sa, sb, strict=True))
    return bool(same) and a["steps"] == b["steps"]


def main() -> None:
    deepspeed.init_distributed(dist_backend="nccl")
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen)) for _ in range(6)]
    runs = {}
    for fp16 in (False, True):
        model = make_model().cuda()
        engine, _, _, _ = ds_spngd.initialize(model=model, model_parameters=model.parameters(), config=config(fp16))
        dtype = torch.half if fp16 else torch.float32
        losses = []
        for i, (x, y) in enumerate(batches):
            if fp16 and i == 3:  # inject an overflow: DeepSpeed must skip, SP-NGD must not move
                before = snapshot(engine, model)
                loss = F.cross_entropy(engine(x.cuda().to(dtype)).float(), y.cuda()) * float("inf")
                engine.backward(loss)
                engine.step()
                assert engine.skipped_steps >= 1, "DeepSpeed did not skip the overflowing step"
                assert equal(before, snapshot(engine, model)), "the skipped step changed SP-NGD's state"
            loss = F.cross_entropy(engine(x.cuda().to(dtype)).float(), y.cuda())
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        runs[fp16] = losses
    dev = max(abs(a - b) for a, b in zip(runs[False], runs[True], strict=True))
    assert dev < 5e-2, f"fp16 ZeRO-2 loss trajectory deviates from fp32 by {dev}"
    print(f"FP16 OK max|Δloss|={dev:.4g} fp32={runs[False]} fp16={runs[True]}")


if __name__ == "__main__":
    main()
