"""One rank of the Hugging Face Trainer route test (tests/integrations/test_hf_routes.py), on gloo CPU ranks.

Run as ``python tests/support/hf_trainer_worker.py OUT_DIR`` with the torch.distributed environment of one rank.
Cases, in sequence, each on a fresh tiny GPT-2 from the same seed and the same sequential data (ZeRO-2, fp32,
constant LR, no warmup, SP-NGD refreshing factors every step and inverting every 2nd):

* ``checks``: SPNGDTrainer construction errors, and the clipping warnings: max_grad_norm with no gradient_clipping
  key (at construction), ``"gradient_clipping": "auto"`` with max_grad_norm=1 (at the start of a 1-step run);
* ``trainer``: SPNGDTrainer with ``"type": "SPNGD"``, ``"lr"`` / ``"weight_decay"``: ``"auto"``, STEPS steps, a
  checkpoint every SAVE_AT steps;
* ``plain``: ``ds_spngd.initialize`` with the same config (numbers instead of "auto"), the Trainer's decay groups and
  the batches the Trainer's sharded sequential loader gives (rank r, step k: batch 2k + r);
* ``resumed``: a new SPNGDTrainer resumed from the ``trainer`` run's checkpoint at SAVE_AT, trained to STEPS;
* ``client``: SPNGDTrainer with ``optimizers=(SPNGD(...), None)`` and no optimizer section;
* ``patched``: ``deepspeed.initialize = ds_spngd.initialize``, then ``deepspeed.initialize(optimizer=SPNGD(...))``
  (a client SP-NGD through the replaced attribute) on the plain loop.

Writes ``OUT_DIR/<case>.r<rank>.pt``: per-step local losses, input checksums, final parameters and SP-NGD factors,
the SP-NGD object's step count and groups, and what the case checks.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from transformers import TrainingArguments

from tests.support.harness import ROOT, teardown

sys.path.insert(0, str(ROOT / "examples"))

from gpt2_shakespeare import ShakespeareWindows, tiny_gpt2  # noqa: E402

import ds_spngd  # noqa: E402
from ds_spngd.config import SPNGDConfigError  # noqa: E402
from ds_spngd.integrations.transformers import SPNGDTrainer, trainer_param_groups  # noqa: E402

STEPS, SAVE_AT, BATCH, CONTEXT, LR, WD = 6, 3, 4, 32, 0.03, 0.1
PARAMS = {"momentum": 0.9, "damping": 0.01, "fisher_type": "emp", "factor_decay": 0.75, "factor_update_steps": 1,
          "inv_update_steps": 2, "kl_clip": 0.01}


def ds_config(lr: Any = "auto", wd: Any = "auto", section: bool = True, stage: int = 2) -> dict[str, Any]:
    """ZeRO-2 (or ``stage``; 3 partitions every parameter) fp32; the SPNGD section (when ``section``) with ``lr`` /
    ``weight_decay``."""
    zero: dict[str, Any] = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    cfg: dict[str, Any] = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                           "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                           "zero_optimization": zero, "steps_per_print": 10**6}
    if section:
        cfg["optimizer"] = {"type": "SPNGD", "params": {"lr": lr, "weight_decay": wd, **PARAMS}}
    return cfg


class RecordingTrainer(SPNGDTrainer):
    """SPNGDTrainer that records each micro-step's local loss and input checksum, and its optimizer's groups."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.losses: list[float] = []
        self.inputs: list[int] = []
        self.groups: list[tuple[float, list[str]]] = []

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        self.inputs.append(int(inputs["input_ids"].sum()))
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.losses.append(float(loss))
        return loss

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        opt = super().create_optimizer(model)
        assert self.model is not None
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.groups = [(float(g["weight_decay"]), [names[id(p)] for p in g["params"]]) for g in opt.param_groups]
        return opt


def training_args(out: Path, name: str, config: dict[str, Any], **extra: Any) -> TrainingArguments:
    """Constant LR, no warmup, sequential data, local token averaging, fp32 on the CPU."""
    base = dict(output_dir=str(out / name), deepspeed=config, max_steps=STEPS, per_device_train_batch_size=BATCH,
                learning_rate=LR, weight_decay=WD, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
                train_sampling_strategy="sequential", average_tokens_across_devices=False, save_steps=SAVE_AT,
                logging_steps=1, report_to="none", disable_tqdm=True, use_cpu=True, seed=0)
    return TrainingArguments(**{**base, **extra})


def final_state(model: torch.nn.Module, spngd: Any) -> dict[str, Any]:
    """Final parameters (gathered under ZeRO 3: a collective) and SP-NGD factors (fp32 copies) and step count."""
    named = list(model.named_parameters())
    zero3 = any(hasattr(p, "ds_tensor") for _, p in named)
    with deepspeed.zero.GatheredParameters([p for _, p in named], enabled=zero3):
        params = {n: p.detach().float().clone() for n, p in named}
    return {"params": params,
            "factors": {f.name: f.value.detach().clone() for b in spngd.blocks for f in b.factors
                        if f.value is not None},
            "factor_versions": {f.name: int(f.version) for b in spngd.blocks for f in b.factors},
            "steps": int(spngd.steps)}


def run_trainer(out: Path, data: Any, name: str, config: dict[str, Any], resume: str | None = None,
                client_groups_from: RecordingTrainer | None = None) -> tuple[RecordingTrainer, dict[str, Any]]:
    """An SPNGDTrainer run (with ``client_groups_from``: an SP-NGD built here on that trainer's decay groups, passed
    in ``optimizers``); its record."""
    model = tiny_gpt2(data.vocab_size, CONTEXT)
    optimizers: Any = (None, None)
    if client_groups_from is not None:
        groups = trainer_param_groups(client_groups_from, model)
        optimizers = (ds_spngd.SPNGD(groups, model=model, config={"lr": LR, "weight_decay": WD, **PARAMS}), None)
    trainer = RecordingTrainer(model=model, args=training_args(out, name, config), train_dataset=data,
                               optimizers=optimizers)
    trainer.train(resume_from_checkpoint=resume)
    engine: Any = trainer.model_wrapped
    assert trainer.model is not None
    spngd = ds_spngd.get_spngd(engine)
    expected = trainer.spngd_built if trainer.spngd_built is not None else trainer.client_spngd
    rec = {"losses": trainer.losses, "inputs": trainer.inputs, "groups": trainer.groups,
           "engine_wraps_spngd": spngd is not None and spngd is expected,
           "zero_stage": int(engine.zero_optimization_stage()), "lr": spngd.cfg.lr if spngd else None,
           **final_state(trainer.model, spngd)}
    return trainer, rec


def run_plain(data: Any, groups_from: RecordingTrainer, patched: bool) -> dict[str, Any]:
    """The ds_spngd.initialize loop on the batches the Trainer's loader gives (rank r, step k: batch 2k + r)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_gpt2(data.vocab_size, CONTEXT)
    groups = trainer_param_groups(groups_from, model)
    cfg = {**ds_config(LR, WD), "train_batch_size": BATCH * world, "train_micro_batch_size_per_gpu": BATCH,
           "gradient_accumulation_steps": 1, "gradient_clipping": 0.0}
    if patched:  # a script that replaced deepspeed.initialize, handing DeepSpeed its own SP-NGD
        original = deepspeed.initialize
        deepspeed.initialize = ds_spngd.initialize
        try:
            spngd = ds_spngd.SPNGD(groups, model=model, config={**cfg["optimizer"]["params"]})
            del cfg["optimizer"]
            engine, *_ = deepspeed.initialize(model=model, optimizer=spngd, config=cfg)
        finally:
            deepspeed.initialize = original
    else:
        engine, *_ = ds_spngd.initialize(model=model, model_parameters=groups, config=cfg)
    losses, inputs = [], []
    for k in range(STEPS):
        batch = [data[i] for i in range((world * k + rank) * BATCH, (world * k + rank + 1) * BATCH)]
        ids, labels = torch.stack([b["input_ids"] for b in batch]), torch.stack([b["labels"] for b in batch])
        inputs.append(int(ids.sum()))
        loss = engine(input_ids=ids, labels=labels).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    spngd_obj = ds_spngd.get_spngd(engine)
    return {"losses": losses, "inputs": inputs, "engine_wraps_spngd": spngd_obj is not None,
            **final_state(model, spngd_obj)}


class Collect(logging.Handler):
    """Keeps the messages of the records it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def construction_checks(out: Path, data: Any) -> dict[str, Any]:
    """SPNGDTrainer's errors at construction and the max_grad_norm warning."""
    rec: dict[str, Any] = {}
    bad = ds_config()
    bad["optimizer"]["params"]["momentum"] = "auto"
    try:
        SPNGDTrainer(model=tiny_gpt2(data.vocab_size, CONTEXT), args=training_args(out, "bad", bad),
                     train_dataset=data)
        rec["auto_momentum"] = "no error"
    except SPNGDConfigError as err:
        rec["auto_momentum"] = str(err)
    model = tiny_gpt2(data.vocab_size, CONTEXT)
    spngd = ds_spngd.SPNGD(model.parameters(), model=model, config={"lr": LR})
    try:
        SPNGDTrainer(model=model, args=training_args(out, "both", ds_config()), train_dataset=data,
                     optimizers=(spngd, None))
        rec["client_and_section"] = "no error"
    except ValueError as err:
        rec["client_and_section"] = str(err)
    handler = Collect()
    logging.getLogger("ds_spngd").addHandler(handler)
    unclipped = {k: v for k, v in ds_config().items() if k != "gradient_clipping"}
    SPNGDTrainer(model=tiny_gpt2(data.vocab_size, CONTEXT), args=training_args(out, "clip", unclipped,
                                                                               max_grad_norm=1.0), train_dataset=data)
    rec["unset_clip_warnings"] = list(handler.messages)
    handler.messages.clear()
    auto_clip = training_args(out, "auto_clip", ds_config(), max_grad_norm=1.0, max_steps=1, save_strategy="no")
    SPNGDTrainer(model=tiny_gpt2(data.vocab_size, CONTEXT), args=auto_clip, train_dataset=data).train()
    rec["auto_clip_warnings"] = list(handler.messages)
    logging.getLogger("ds_spngd").removeHandler(handler)
    return rec


def main() -> None:
    """Run the cases (module docstring) and save one record per case."""
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    data = ShakespeareWindows(context=CONTEXT, max_windows=BATCH * 2 * STEPS)
    save = lambda name, rec: torch.save(rec, out / f"{name}.r{rank}.pt")  # noqa: E731
    save("checks", construction_checks(out, data))
    trainer, rec = run_trainer(out, data, "trainer", ds_config())
    save("trainer", rec)
    save("plain", run_plain(data, trainer, patched=False))
    ckpt = out / "trainer" / f"checkpoint-{SAVE_AT}"
    save("resumed", run_trainer(out, data, "resumed", ds_config(), resume=str(ckpt))[1])
    save("client", run_trainer(out, data, "client", ds_config(section=False), client_groups_from=trainer)[1])
    save("patched", run_plain(data, trainer, patched=True))
    # ZeRO 3 last: DeepSpeed's stage-3 engine leaves process-wide state that changes later runs in the last bits
    save("trainer_z3", run_trainer(out, data, "trainer_z3", ds_config(stage=3))[1])
    ckpt = out / "trainer_z3" / f"checkpoint-{SAVE_AT}"
    save("resumed_z3", run_trainer(out, data, "resumed_z3", ds_config(stage=3), resume=str(ckpt))[1])
    teardown()


if __name__ == "__main__":
    main()
