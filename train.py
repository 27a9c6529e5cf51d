"""Reference DeepSpeed training script for ds_spngd (MNIST by default, Fashion-MNIST, or an image folder).

Usage::

    deepspeed --num_gpus 2 train.py --deepspeed_config ds_configs/spngd.json [--model cnn] [--epochs E]
        [--global-batch B] [--target-acc 0.985] [--stop-at-target] [--eval-interval K]
        [--dataset mnist|fashion-mnist | --data-path DIR]
        [--image-size S] [--image-backend auto|dali|pil] [--val-fraction F] [--out-dir runs/NAME] [--seed S]
        [--max-steps N] [--bn-recalib-batches K]

The JSON is read here, passed through :func:`ds_spngd_lab.schedules.scaling.resolve_config` (global batch override,
``batch_scaling`` LR rule, ``"auto"`` scheduler fields) and handed to ``ds_spngd.initialize``. Each optimizer step
runs ``gradient_accumulation_steps`` micro-batches of ``forward -> engine.backward -> engine.step``. Test top-1 is
evaluated every ``--eval-interval`` optimizer steps (default: once per epoch) and at the end, sharded over ranks;
evaluation time is excluded from the reported training wall time. Rank 0 writes ``steps.csv`` and ``result.json`` to
``--out-dir`` and prints a result table (with the final gradient noise scale ``noise_scale_B_simple``, and
``noise_scale_B_simple_at_target`` at the evaluation that first reached ``--target-acc``, when the config's
``"gradient_noise_scale"`` section enables it, :mod:`ds_spngd.integrations.deepspeed.noise_scale`). The config's
``"adversarial"`` section trains on clean + adversarial (FGSM/PGD in normalised-pixel space) examples, plain or
ConAdv (:mod:`ds_spngd_lab.adversarial`). With DeepSpeed's
``wandb`` monitor section, rank 0 also writes the run settings and resolved JSON to the W&B run's config, logs
``Train/loss``, ``Train/lr`` and ``Train/step`` every step, and finishes the W&B run (DeepSpeed never does) with the
result as its summary.

The loop, the step log, the result table and the W&B run are the lab's (:mod:`ds_spngd_lab.loop`,
:mod:`ds_spngd_lab.results`, :mod:`ds_spngd_lab.wandb_run`), shared with train_lm.py; this script holds the command
line, the data, the model and the top-1 evaluation's wiring (:mod:`ds_spngd_lab.evaluation`).
"""

from __future__ import annotations

import argparse
import math
import os
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.nn.functional as F

import ds_spngd
from ds_spngd_lab.adversarial import AdversarialStep, AdversarialTask, parse_adversarial
from ds_spngd_lab.data.fashion_mnist import load_fashion_mnist
from ds_spngd_lab.data.image_folder import BatchSource, discover, load_image_folder
from ds_spngd_lab.data.mnist import IMAGE_SHAPE, NUM_CLASSES, MnistSplits, load_mnist
from ds_spngd_lab.data.sampler import BatchPlan, TensorBatches, steps_per_epoch
from ds_spngd_lab.evaluation import check_buffer_dtypes, top1_accuracy
from ds_spngd_lab.loop import (
    TOP1,
    LoopPlan,
    TrainingLoop,
    build_engine,
    engine_dtype,
    optimizer_type,
    read_ds_config,
    report_run,
)
from ds_spngd_lab.models import MODEL_NAMES, build_model
from ds_spngd_lab.ranks import finish_ranks, start_ranks
from ds_spngd_lab.results import RunResult, format_table
from ds_spngd_lab.schedules.scaling import batch_layout, resolve_config
from ds_spngd_lab.wandb_run import active_wandb_run

DATASETS: dict[str, Callable[[], MnistSplits]] = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line (DeepSpeed's ``--deepspeed_config`` etc. are added by ``deepspeed.add_config_arguments``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cnn", choices=MODEL_NAMES)
    p.add_argument("--epochs", type=float, default=5.0, help="training length in epochs (may be fractional)")
    p.add_argument("--global-batch", type=int, default=None, help="override train_batch_size (samples per step)")
    p.add_argument("--target-acc", type=float, default=None, help="report steps/time to this test top-1 (0..1)")
    p.add_argument("--stop-at-target", action="store_true", help="stop once --target-acc is reached")
    p.add_argument("--eval-interval", type=int, default=None, help="evaluate every K optimizer steps (default: epoch)")
    p.add_argument("--dataset", default=None, choices=tuple(DATASETS),
                   help="built-in data set (default mnist): train on its 50k train split, evaluate on its 10k test "
                        "split; fashion-mnist needs `apt-get install dataset-fashion-mnist` or FASHION_MNIST_DIR")
    p.add_argument("--data-path", default=None, help="image folder (root/train + root/val, or root/<class>)")
    p.add_argument("--image-size", type=int, default=224, help="crop side for --data-path images")
    p.add_argument("--image-backend", default="auto", choices=("auto", "dali", "pil"),
                   help="decoder for --data-path: DALI when importable (auto), or force one")  # fmt: skip
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation share of a single-folder --data-path")
    p.add_argument("--out-dir", default=None,
                   help="output folder (default runs/<config>_<model>_b<B>_w<world>[_fashion-mnist])")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--bn-recalib-batches", type=int, default=0,
                   help="before each evaluation, recompute BatchNorm statistics on this rank's last K training "
                        "micro-batches (precise BN); 0 keeps DeepSpeed/PyTorch's running EMA")  # fmt: skip
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    if args.deepspeed_config is None:
        p.error("--deepspeed_config is required")
    if args.dataset is not None and args.data_path is not None:
        p.error("give --dataset or --data-path, not both")
    if args.target_acc is not None and not 0.0 < args.target_acc <= 1.0:
        p.error(f"--target-acc must lie in (0, 1], got {args.target_acc}")
    if args.bn_recalib_batches < 0:
        p.error(f"--bn-recalib-batches must be >= 0, got {args.bn_recalib_batches}")
    for name in ("epochs", "global_batch", "eval_interval", "max_steps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    return args


SourceFactory = Callable[[BatchPlan], tuple[BatchSource, BatchSource]]


def dataset_name(args: argparse.Namespace) -> str:
    """``"mnist"``, ``"fashion-mnist"`` or ``"folder:<--data-path>"`` (for the settings table)."""
    return f"folder:{args.data_path}" if args.data_path is not None else args.dataset or "mnist"


def open_data(args: argparse.Namespace) -> tuple[int, SourceFactory, int, int, int]:
    """Open MNIST / Fashion-MNIST (``--dataset``) or ``--data-path`` before the batch layout is known.

    Returns:
        ``(n_train, make_sources, num_classes, in_channels, image_size)``; ``make_sources(plan)`` gives the
        ``(train, test)`` batch sources for a :class:`BatchPlan`.

    Raises:
        FileNotFoundError: the data set is not installed (the message says how to install it).
    """
    if args.data_path is None:
        mnist = DATASETS[args.dataset or "mnist"]()

        def mnist_sources(plan: BatchPlan) -> tuple[BatchSource, BatchSource]:
            return TensorBatches(mnist.train_x, mnist.train_y, plan), TensorBatches(mnist.test_x, mnist.test_y, plan)

        return len(mnist.train_y), mnist_sources, NUM_CLASSES, IMAGE_SHAPE[0], IMAGE_SHAPE[1]
    splits = discover(args.data_path, args.val_fraction, args.seed)

    def folder_sources(plan: BatchPlan) -> tuple[BatchSource, BatchSource]:
        train, val, _ = load_image_folder(args.data_path, plan, image_size=args.image_size,
                                          val_fraction=args.val_fraction, backend=args.image_backend)  # fmt: skip
        return train, val

    return len(splits.train_files), folder_sources, len(splits.classes), 3, args.image_size


def run_settings(args: argparse.Namespace, config: dict[str, Any], config_path: Path, engine: Any, world: int,
                 layout: tuple[int, int, int], spe: int, dtype: torch.dtype) -> dict[str, Any]:
    """The settings rows of the result table and ``result.json`` (``layout``: global batch, micro-batch, GAS)."""
    basic = type(getattr(engine, "basic_optimizer", None))
    return {"dataset": dataset_name(args), "model": args.model, "optimizer": optimizer_type(config),
            "optimizer_class": f"{basic.__module__.split('.')[0]}.{basic.__name__}",
            "config": str(config_path), "world_size": world,
            "global_batch": layout[0], "micro_batch": layout[1], "gradient_accumulation_steps": layout[2],
            "steps_per_epoch": spe, "seed": args.seed, "dtype": str(dtype).removeprefix("torch."),
            "bn_recalib_batches": args.bn_recalib_batches}  # fmt: skip


def main(argv: list[str] | None = None) -> RunResult:
    """Train with the command line ``argv`` (None: ``sys.argv``) and return the run's result (on every rank)."""
    args = parse_args(argv)
    rank, world = start_ranks()
    config_path, raw = read_ds_config(args)
    global_batch = args.global_batch or batch_layout(raw, world)[0]
    n_train, make_sources, num_classes, in_channels, image_size = open_data(args)
    spe = steps_per_epoch(n_train, global_batch)
    config = resolve_config(raw, global_batch, spe, args.epochs, world_size=world)
    adv_cfg = parse_adversarial(config)  # before anything is built: a bad section fails fast, naming the key
    global_batch, micro, gas = batch_layout(config, world)
    train_src, test_src = make_sources(BatchPlan(rank=rank, world=world, micro_batch=micro, gas=gas, seed=args.seed))
    spe = train_src.steps_per_epoch

    torch.manual_seed(args.seed)
    model = build_model(args.model, num_classes, in_channels, image_size=image_size)
    engine, skips_nonfinite = build_engine(args, model, model.parameters(), config)
    dtype = engine_dtype(engine)
    check_buffer_dtypes(engine.module, dtype)

    total_steps = math.ceil(args.epochs * spe)
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    eval_interval = args.eval_interval or spe
    suffix = f"_{args.dataset}" if args.dataset not in (None, "mnist") else ""
    out_dir = Path(args.out_dir or f"runs/{config_path.stem}_{args.model}_b{global_batch}_w{world}{suffix}")
    settings = run_settings(args, config, config_path, engine, world, (global_batch, micro, gas), spe, dtype)
    if adv_cfg.enabled:
        settings["adversarial"] = adv_cfg.describe()
    wandb_run = active_wandb_run() if rank == 0 else None  # opened by the JSON's "wandb" monitor section
    if wandb_run is not None:
        wandb_run.config.update({**settings, "epochs": args.epochs, "target_acc": args.target_acc,
                                 "eval_interval": eval_interval, "total_steps": total_steps, "ds_config": config},
                                allow_val_change=True)  # fmt: skip

    recent: deque[torch.Tensor] = deque(maxlen=args.bn_recalib_batches)  # inputs for --bn-recalib-batches

    def prepare(x: torch.Tensor) -> torch.Tensor:
        x = x.to(engine.device, dtype=dtype)
        if args.bn_recalib_batches:
            recent.append(x)
        return x

    def criterion(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y.to(engine.device))

    def forward_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return criterion(engine(prepare(x)), y)

    adversarial = AdversarialStep(adv_cfg, engine, AdversarialTask(prepare, criterion)) if adv_cfg.enabled else None

    noise_at_target: list[float | None] = []  # B_simple when the target was first reached (the final one can be ~0/0)
    plan = LoopPlan(total_steps=total_steps, steps_per_epoch=spe, global_batch=global_batch, micro_batches=gas,
                    eval_interval=eval_interval, desc=f"{settings['optimizer']} {args.model}", target=args.target_acc,
                    stop_at_target=args.stop_at_target)  # fmt: skip
    loop = TrainingLoop(engine, plan, TOP1, forward_loss, lambda: top1_accuracy(engine, test_src, dtype, world, recent),
                        rank=rank, world=world, skips_nonfinite=skips_nonfinite,
                        on_target=lambda _: noise_at_target.append(ds_spngd.noise_scale_stats(engine).get("B_simple")),
                        adversarial=adversarial)
    out = loop.run(train_src, out_dir / "steps.csv")

    reached = out.reached
    result = RunResult(
        epochs=out.steps / spe, steps=out.steps, wall_time_s=out.train_time_s, test_top1=out.metric,
        final_loss=out.loss, target_acc=args.target_acc, steps_to_target=reached[0] if reached else None,
        time_to_target_s=reached[1] if reached else None, epochs_to_target=reached[0] / spe if reached else None,
        evals=tuple(out.evals),
    )  # fmt: skip
    noise = ds_spngd.noise_scale_stats(engine)  # empty unless "gradient_noise_scale" is enabled and measurable
    if noise:
        settings["noise_scale_B_simple"] = noise["B_simple"]
    if noise_at_target and noise_at_target[0] is not None:
        settings["noise_scale_B_simple_at_target"] = noise_at_target[0]
    summary = {k: v for k, v in result.to_json_dict().items() if k != "evals"}
    report_run(rank, out_dir / "result.json", {**settings, **result.to_json_dict()},
               lambda: format_table(result, extra={k: str(v) for k, v in settings.items()}),
               wandb_summary={**summary, **{k: v for k, v in settings.items() if k.startswith("noise_scale_")}})
    return result


if __name__ == "__main__":
    main()
    finish_ranks()
