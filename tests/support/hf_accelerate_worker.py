"""One rank of the Accelerate route test (tests/integrations/test_hf_routes.py), on gloo CPU ranks.

Run as ``python tests/support/hf_accelerate_worker.py OUT_DIR`` with the torch.distributed environment of one rank.
Cases, in sequence, each on a fresh tiny GPT-2 from the same seed, ZeRO-2 + bf16, constant LR:

* ``accelerate``: :class:`ds_spngd.integrations.accelerate.SPNGDAccelerator` with the DeepSpeed plugin built in code
  (``"type": "SPNGD"``, ``"lr"`` / ``"weight_decay"``: ``"auto"``), gloo as on any CPU machine
  (``InitProcessGroupKwargs(backend="gloo")``), ``prepare(model, DummyOptim(groups), sequential loader)``, STEPS
  steps, then ``accelerator.save_state``;
* ``plain``: ``ds_spngd.initialize`` with the same config (numbers instead of "auto") and groups, on the batches
  Accelerate's sharded sequential loader gives (rank r, step k: batch 2k + r).

Writes ``OUT_DIR/<case>.r<rank>.pt``: per-step local losses and input checksums, final parameters and SP-NGD
factors, SP-NGD's step count, what the engine runs (ZeRO stage, bf16) and Accelerate's process count.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import DeepSpeedPlugin, DummyOptim, InitProcessGroupKwargs

from tests.support.harness import ROOT, teardown

sys.path.insert(0, str(ROOT / "examples"))

from gpt2_shakespeare import ShakespeareWindows, tiny_gpt2  # noqa: E402

import ds_spngd  # noqa: E402
from ds_spngd.integrations.accelerate import SPNGDAccelerator  # noqa: E402
from ds_spngd_lab.models.gpt import param_groups  # noqa: E402

STEPS, BATCH, CONTEXT, LR, WD = 6, 4, 32, 0.03, 0.1
PARAMS = {"momentum": 0.9, "damping": 0.01, "fisher_type": "emp", "factor_decay": 0.75, "factor_update_steps": 1,
          "inv_update_steps": 2, "kl_clip": 0.01}


def ds_config(lr: Any = "auto", wd: Any = "auto") -> dict[str, Any]:
    """ZeRO-2, bf16, no clipping, the SPNGD section with ``lr`` / ``weight_decay``."""
    return {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1,
            "gradient_clipping": 0, "zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
            "optimizer": {"type": "SPNGD", "params": {"lr": lr, "weight_decay": wd, **PARAMS}},
            "steps_per_print": 10**6}


def final_state(model: torch.nn.Module, spngd: Any) -> dict[str, Any]:
    """Final parameters (fp32 copies of the module's bf16 ones) and SP-NGD factors, and the step count."""
    return {"params": {n: p.detach().float().clone() for n, p in model.named_parameters()},
            "factors": {f.name: f.value.detach().clone() for b in spngd.blocks for f in b.factors
                        if f.value is not None},
            "steps": int(spngd.steps)}


def run_accelerate(out: Path, data: Any) -> dict[str, Any]:
    """The Accelerate route (module docstring)."""
    plugin = DeepSpeedPlugin(hf_ds_config=ds_config())
    accelerator = SPNGDAccelerator(deepspeed_plugin=plugin, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    model = tiny_gpt2(data.vocab_size, CONTEXT)
    raw = model
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False)
    optimizer = DummyOptim(param_groups(model, WD), lr=LR, weight_decay=WD)
    engine, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses, inputs = [], []
    for step, batch in enumerate(loader):
        if step == STEPS:
            break
        inputs.append(int(batch["input_ids"].sum()))
        loss = engine(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach().float()))
    accelerator.save_state(str(out / "accelerate_state"))
    spngd = ds_spngd.get_spngd(engine)
    return {"losses": losses, "inputs": inputs, "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type), "engine_wraps_spngd": spngd is not None,
            "section_taken": "optimizer" not in plugin.deepspeed_config,
            "lr": spngd.cfg.lr if spngd else None, "group_wd": [g["weight_decay"] for g in spngd.param_groups],
            "zero_stage": int(engine.zero_optimization_stage()), "bf16": bool(engine.bfloat16_enabled()),
            **final_state(raw, spngd)}


def run_plain(data: Any) -> dict[str, Any]:
    """The ds_spngd.initialize loop on the batches Accelerate's loader gives (rank r, step k: batch 2k + r)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_gpt2(data.vocab_size, CONTEXT)
    cfg = {**ds_config(LR, WD), "train_batch_size": BATCH * world, "train_micro_batch_size_per_gpu": BATCH}
    engine, *_ = ds_spngd.initialize(model=model, model_parameters=param_groups(model, WD), config=cfg)
    losses, inputs = [], []
    for k in range(STEPS):
        batch = [data[i] for i in range((world * k + rank) * BATCH, (world * k + rank + 1) * BATCH)]
        ids, labels = torch.stack([b["input_ids"] for b in batch]), torch.stack([b["labels"] for b in batch])
        inputs.append(int(ids.sum()))
        loss = engine(input_ids=ids, labels=labels).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach().float()))
    return {"losses": losses, "inputs": inputs, **final_state(model, ds_spngd.get_spngd(engine))}


def main() -> None:
    """Run the cases (module docstring) and save one record per case."""
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    data = ShakespeareWindows(context=CONTEXT, max_windows=BATCH * 2 * STEPS)
    torch.save(run_accelerate(out, data), out / f"accelerate.r{rank}.pt")
    torch.save(run_plain(data), out / f"plain.r{rank}.pt")
    teardown()


if __name__ == "__main__":
    main()
