r"""An Accelerate + DeepSpeed script trained with SP-NGD: the usual ``accelerator.prepare(model, optimizer, loader,
scheduler)`` loop with ``DummyOptim`` / ``DummyScheduler`` (the optimizer and scheduler live in the DeepSpeed config,
``examples/accelerate_gpt2.json``: ``"type": "SPNGD"`` with ``"lr"`` / ``"weight_decay"``: ``"auto"``, DeepSpeed's
``WarmupLR``, ZeRO-2, bf16). The SP-NGD-specific line is the accelerator class,
:class:`ds_spngd.integrations.accelerate.SPNGDAccelerator` instead of ``accelerate.Accelerator``.

Model: ``GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64))`` built from its config; data: the lab's
character-level Shakespeare in 64-token windows (``examples/gpt2_shakespeare.py``), shuffled and sharded over the
ranks by Accelerate. Rank 0 prints the loss (mean over ranks) every ``--log_every`` steps; at the end
``accelerator.save_state`` writes a checkpoint with SP-NGD's ``spngd_rank*.pt`` shards.

One command, 2 CPU ranks, about a minute (from the repository root; the ``rm`` removes the shared-memory buffers
DeepSpeed's CPU op leaves in /dev/shm for this port)::

    .venv/bin/torchrun --nproc_per_node 2 --master_port 29732 examples/accelerate_gpt2.py; \
        rm -f /dev/shm/deepspeed_allreduce_buffer_*_29732_*

(``.venv/bin/deepspeed --num_gpus 2 --master_port 29732 examples/accelerate_gpt2.py`` works the same.)

CPU notes (accelerate 1.16, measured): on a machine without CUDA, Accelerate's ``PartialState`` does not treat a
launched rank as distributed unless ``cpu=True`` or a backend is given — each rank then believes it is process 0 of 1
and gets the whole (unsharded) data while DeepSpeed averages over 2 ranks — and ``cpu=True`` drops DeepSpeed for DDP.
This script therefore passes ``InitProcessGroupKwargs(backend="gloo")`` when CUDA is absent (``PartialState(cpu=True)``
before the accelerator works as well). Its DeepSpeed plugin is built in code unless the launcher configured one, so
``accelerate launch --use_deepspeed --deepspeed_config_file examples/accelerate_gpt2.json --num_processes 2
examples/accelerate_gpt2.py`` works too (on CPU as well; no ``accelerate config`` file needed).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from accelerate.utils import DeepSpeedPlugin, DummyOptim, DummyScheduler, InitProcessGroupKwargs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # examples/gpt2_shakespeare.py

from gpt2_shakespeare import ShakespeareWindows, tiny_gpt2  # noqa: E402

from ds_spngd import get_spngd  # noqa: E402
from ds_spngd.integrations.accelerate import SPNGDAccelerator  # noqa: E402
from ds_spngd_lab.models.gpt import param_groups  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args() -> argparse.Namespace:
    """Command line (``--local_rank`` is the deepspeed launcher's)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--deepspeed_config", default=os.path.join(HERE, "accelerate_gpt2.json"))
    p.add_argument("--output_dir", default="runs/accelerate_gpt2")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch_size", type=int, default=16, help="per rank")
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--local_rank", type=int, default=-1)
    return p.parse_args()


def make_accelerator(deepspeed_config: str) -> SPNGDAccelerator:
    """The accelerator: the launcher's DeepSpeed plugin if one is configured (``accelerate launch``), else one built
    from ``deepspeed_config``; gloo on a machine without CUDA (module docstring)."""
    configured = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    plugin = None if configured else DeepSpeedPlugin(hf_ds_config=deepspeed_config)
    handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    return SPNGDAccelerator(deepspeed_plugin=plugin, kwargs_handlers=handlers)


def main() -> None:
    """Train ``--steps`` steps, log the loss, save the state."""
    a = parse_args()
    accelerator = make_accelerator(a.deepspeed_config)
    data = ShakespeareWindows(context=64)
    loader = torch.utils.data.DataLoader(data, batch_size=a.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    model = tiny_gpt2(data.vocab_size, context=64)
    optimizer = DummyOptim(param_groups(model, a.weight_decay), lr=a.lr, weight_decay=a.weight_decay)
    scheduler = DummyScheduler(optimizer, warmup_num_steps=max(1, a.steps // 10))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    accelerator.print(f"{accelerator.num_processes} processes, {accelerator.distributed_type}")
    model.train()
    for step, batch in enumerate(loader, start=1):
        loss = model(**batch).loss
        accelerator.backward(loss)  # DeepSpeed's engine.backward + engine.step (SP-NGD's step, the scheduler)
        optimizer.step()  # no-ops under DeepSpeed; kept so the loop is Accelerate's usual one
        scheduler.step()
        optimizer.zero_grad()
        if step % a.log_every == 0 or step == a.steps:
            mean = accelerator.reduce(loss.detach().float(), reduction="mean")
            accelerator.print(f"step {step:4d}  loss {mean.item():.4f}  lr {scheduler.get_last_lr()[0]:.4g}")
        if step == a.steps:
            break
    accelerator.save_state(a.output_dir)
    spngd = get_spngd(model)
    accelerator.print(f"SP-NGD steps: {spngd.steps if spngd is not None else 'none'}; state in {a.output_dir}")
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
