r"""A Hugging Face Trainer script trained with SP-NGD through DeepSpeed: the only SP-NGD-specific lines are the import
of :class:`ds_spngd.integrations.transformers.SPNGDTrainer` (used instead of ``transformers.Trainer``) and the
``"optimizer": {"type": "SPNGD", ...}`` section of ``examples/trainer_gpt2.json`` (``"lr"`` / ``"weight_decay"``:
``"auto"``, filled from ``--learning_rate`` / ``--weight_decay``).

Model: ``GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64))`` built from its config; data: the lab's
character-level Shakespeare in 64-token windows (``examples/gpt2_shakespeare.py``). ZeRO-2 (the JSON), fp32 on CPU,
the Trainer's cosine schedule with warmup, ``max_grad_norm=0`` (DeepSpeed would clip the raw gradient before SP-NGD
preconditions it). The Trainer logs the loss every ``--logging_steps`` steps and saves a checkpoint (with SP-NGD's
``spngd_rank*.pt`` shards) every ``--save_steps``.

One command, 2 CPU ranks, about a minute (from the repository root; the port names the shared-memory buffers
DeepSpeed's CPU op leaves in /dev/shm, removed by the ``rm``)::

    .venv/bin/deepspeed --num_gpus 2 --master_port 29731 examples/trainer_gpt2.py; \
        rm -f /dev/shm/deepspeed_allreduce_buffer_*_29731_*

Resume from the last checkpoint (SP-NGD's factors, preconditioners and momentum are restored) with
``--resume`` (e.g. after ``--max_steps 100``, rerun with ``--max_steps 200 --resume``). ``torchrun --nproc_per_node 2
examples/trainer_gpt2.py`` works too. On a GPU machine drop nothing: ``use_cpu`` is set only without CUDA.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from transformers import TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # examples/gpt2_shakespeare.py

from gpt2_shakespeare import ShakespeareWindows, tiny_gpt2  # noqa: E402

from ds_spngd import get_spngd  # noqa: E402
from ds_spngd.integrations.transformers import SPNGDTrainer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args() -> argparse.Namespace:
    """Command line (``--local_rank`` is the deepspeed launcher's)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--deepspeed", default=os.path.join(HERE, "trainer_gpt2.json"), help="DeepSpeed JSON")
    p.add_argument("--output_dir", default="runs/trainer_gpt2")
    p.add_argument("--max_steps", type=int, default=150)
    p.add_argument("--per_device_train_batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=0.03)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--save_steps", type=int, default=50)
    p.add_argument("--max_grad_norm", type=float, default=0.0,
                   help='DeepSpeed clips the raw gradient at this norm ("gradient_clipping": "auto"); 0: off')
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output_dir")
    p.add_argument("--local_rank", type=int, default=-1)
    return p.parse_args()


def main() -> None:
    """Train, print SP-NGD's step count on rank 0."""
    a = parse_args()
    data = ShakespeareWindows(context=64)
    model = tiny_gpt2(data.vocab_size, context=64)
    args = TrainingArguments(
        output_dir=a.output_dir, deepspeed=a.deepspeed, max_steps=a.max_steps,
        per_device_train_batch_size=a.per_device_train_batch_size, learning_rate=a.learning_rate,
        weight_decay=a.weight_decay, lr_scheduler_type="cosine", warmup_steps=max(1, a.max_steps // 10),
        max_grad_norm=a.max_grad_norm, logging_steps=a.logging_steps, save_steps=a.save_steps, save_total_limit=2,
        report_to="none", disable_tqdm=True, use_cpu=not torch.cuda.is_available(), seed=0,
    )  # fmt: skip
    trainer = SPNGDTrainer(model=model, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    spngd = get_spngd(trainer.model_wrapped)
    if trainer.is_world_process_zero() and spngd is not None:
        print(f"SP-NGD steps: {spngd.steps}; checkpoints in {a.output_dir}", flush=True)


if __name__ == "__main__":
    main()
