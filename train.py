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
``"gradient_noise_scale"`` section enables it, :mod:`ds_spngd.integrations.deepspeed.noise_scale`). With DeepSpeed's ``wandb`` monitor
section, rank 0 also writes the run settings and resolved JSON to the W&B run's config, logs ``Train/loss``,
``Train/lr`` and ``Train/step`` every step, and finishes the W&B run (DeepSpeed never does) with the result as its
summary.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import ds_spngd
from ds_spngd_lab.data.fashion_mnist import load_fashion_mnist
from ds_spngd_lab.data.image_folder import BatchSource, discover, load_image_folder
from ds_spngd_lab.data.mnist import IMAGE_SHAPE, NUM_CLASSES, load_mnist
from ds_spngd_lab.data.sampler import BatchPlan, TensorBatches, steps_per_epoch
from ds_spngd_lab.models import MODEL_NAMES, build_model
from ds_spngd_lab.run_log import (
    RunResult,
    StepLog,
    active_wandb_run,
    agreed_step_loss,
    finish_ranks,
    finish_wandb,
    format_table,
    read_ds_config,
    start_ranks,
    write_result,
)
from ds_spngd_lab.schedules.scaling import batch_layout, resolve_config

EVAL_BATCH = 1000
DATASETS = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist}
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


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


def check_buffer_dtypes(model: nn.Module, dtype: torch.dtype) -> None:
    """Refuse low-precision runs whose floating buffers were left in another dtype.

    DeepSpeed 0.19.8 casts only parameters for bf16/fp16 and keeps buffers (BatchNorm running statistics) as loaded
    unless ``"data_types": {"buffer_dtype": ...}`` is set; BatchNorm then fails at the first forward with
    "expected scalar type BFloat16 but found Float".

    Raises:
        ValueError: naming the first mismatched buffer and the config key that fixes it.
    """
    if dtype == torch.float32:
        return
    for name, buf in model.named_buffers():
        if buf.is_floating_point() and buf.dtype != dtype:
            short = "bf16" if dtype == torch.bfloat16 else "fp16"
            raise ValueError(
                f"buffer {name} is {buf.dtype} but the model runs in {dtype}: DeepSpeed casts only parameters; add "
                f'"data_types": {{"buffer_dtype": "{short}"}} to the DeepSpeed config'
            )


def average_buffers(model: nn.Module, world: int) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks so every rank evaluates one model."""
    if world == 1:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """Precise BatchNorm statistics (Wu & Johnson 2021, arXiv:2105.07576): replace each BN layer's running mean/var
    by their plain average over ``batches`` (recent training inputs, already on the model's device and dtype) under
    the current weights, instead of the EMA that lags behind fast-moving weights. Weights are not changed."""
    bns = [m for m in model.modules() if isinstance(m, BATCH_NORMS) and m.track_running_stats]
    if not bns or not batches:
        return
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    for x in batches:
        model(x)
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    model.train(was_training)


@torch.no_grad()
def evaluate(
    engine: Any, source: BatchSource, dtype: torch.dtype, world: int, recent: Sequence[torch.Tensor] = ()
) -> float:
    """Top-1 accuracy in [0, 1] over the whole evaluation set (each rank its shard; counts all-reduced).

    With ``recent`` training inputs, BatchNorm statistics are first recomputed on them (:func:`recalibrate_bn`);
    either way they are then averaged over ranks so every rank evaluates the same model."""
    recalibrate_bn(engine.module, recent)
    engine.eval()
    average_buffers(engine.module, world)
    counts = torch.zeros(2, dtype=torch.float64)
    for x, y in source.eval_batches(EVAL_BATCH):
        logits = engine(x.to(engine.device, dtype=dtype))
        counts[0] += (logits.argmax(dim=1).cpu() == y.cpu()).sum().item()
        counts[1] += y.numel()
    if world > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    engine.train()
    if counts[1] == 0:
        raise RuntimeError("the evaluation set is empty")
    return float(counts[0] / counts[1])


def main(argv: list[str] | None = None) -> RunResult:
    args = parse_args(argv)
    rank, world = start_ranks()
    config_path, raw = read_ds_config(args)
    global_batch = args.global_batch or batch_layout(raw, world)[0]
    n_train, make_sources, num_classes, in_channels, image_size = open_data(args)
    spe = steps_per_epoch(n_train, global_batch)
    config = resolve_config(raw, global_batch, spe, args.epochs, world_size=world)
    global_batch, micro, gas = batch_layout(config, world)
    plan = BatchPlan(rank=rank, world=world, micro_batch=micro, gas=gas, seed=args.seed)
    train_src, test_src = make_sources(plan)
    spe = train_src.steps_per_epoch

    torch.manual_seed(args.seed)
    model = build_model(args.model, num_classes, in_channels, image_size=image_size)
    engine, _, _, _ = ds_spngd.initialize(args=args, model=model, model_parameters=model.parameters(), config=config)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32
    check_buffer_dtypes(engine.module, dtype)
    spngd = ds_spngd.get_spngd(engine)
    skips_nonfinite = spngd is not None and spngd.cfg.nonfinite == "skip"  # SP-NGD skips such steps on every rank

    total_steps = math.ceil(args.epochs * spe)
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    eval_interval = args.eval_interval or spe
    suffix = f"_{args.dataset}" if args.dataset not in (None, "mnist") else ""
    name = args.out_dir or f"runs/{config_path.stem}_{args.model}_b{global_batch}_w{world}{suffix}"
    out_dir = Path(name)
    optimizer_type = str(config.get("optimizer", {}).get("type", "client"))
    basic = type(getattr(engine, "basic_optimizer", None))
    settings = {"dataset": dataset_name(args), "model": args.model, "optimizer": optimizer_type,
                "optimizer_class": f"{basic.__module__.split('.')[0]}.{basic.__name__}",
                "config": str(config_path), "world_size": world,
                "global_batch": global_batch, "micro_batch": micro, "gradient_accumulation_steps": gas,
                "steps_per_epoch": spe, "seed": args.seed, "dtype": str(dtype).removeprefix("torch."),
                "bn_recalib_batches": args.bn_recalib_batches}  # fmt: skip
    wandb_run = active_wandb_run() if rank == 0 else None  # opened by the JSON's "wandb" monitor section
    if wandb_run is not None:
        wandb_run.config.update({**settings, "epochs": args.epochs, "target_acc": args.target_acc,
                                 "eval_interval": eval_interval, "total_steps": total_steps, "ds_config": config},
                                allow_val_change=True)  # fmt: skip

    log = StepLog(out_dir / "steps.csv", enabled=rank == 0)
    desc = f"{optimizer_type} {args.model}"
    bar = tqdm(total=total_steps, disable=rank != 0, desc=desc, unit="step", mininterval=1.0)
    monitor = engine.monitor if getattr(engine, "monitor", None) is not None and engine.monitor.enabled else None
    train_time, loss_value, acc = 0.0, float("nan"), float("nan")
    reached: tuple[int, float, float] | None = None
    noise_at_target: float | None = None  # B_simple when the target was first reached (the final one can be ~0/0)
    evals: list[tuple[int, float, float]] = []
    recent: deque[torch.Tensor] = deque(maxlen=args.bn_recalib_batches)
    batches = train_src.epoch(0)
    step = 0
    while step < total_steps:
        epoch = step // spe
        if step % spe == 0 and step > 0:
            batches = train_src.epoch(epoch)
        t0 = time.perf_counter()
        lr = float(engine.get_lr()[0])
        loss_sum = torch.zeros(1, dtype=torch.float64)
        for micro_idx in range(gas):
            x, y = next(batches)
            x = x.to(engine.device, dtype=dtype)
            if args.bn_recalib_batches:
                recent.append(x)
            loss = F.cross_entropy(engine(x), y.to(engine.device))
            engine.backward(loss)
            loss_sum += loss.detach().double().cpu()
            if micro_idx == gas - 1:  # before the boundary step: agree on finiteness across ranks
                loss_value = agreed_step_loss(loss_sum, gas, world, step, not skips_nonfinite,
                                              where=f" (epoch {epoch})")
            engine.step()
        step += 1
        train_time += time.perf_counter() - t0
        log.write(step, step * global_batch, loss_value, lr, train_time)
        if monitor is not None:
            samples = engine.global_samples
            monitor.write_events([("Train/loss", loss_value, samples), ("Train/lr", lr, samples),
                                  ("Train/step", step, samples)])
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", top1=f"{acc:.4f}", refresh=False)

        if step % eval_interval == 0 or step == total_steps:
            acc = evaluate(engine, test_src, dtype, world, recent)
            evals.append((step, train_time, acc))
            if monitor is not None:
                monitor.write_events([("Test/top1", acc, engine.global_samples)])
            if args.target_acc is not None and reached is None and acc >= args.target_acc:
                reached = (step, train_time, step / spe)
                noise_at_target = ds_spngd.noise_scale_stats(engine).get("B_simple")
                if args.stop_at_target:
                    break
    bar.close()
    log.close()

    result = RunResult(
        epochs=step / spe, steps=step, wall_time_s=train_time, test_top1=acc, final_loss=loss_value,
        target_acc=args.target_acc, steps_to_target=reached[0] if reached else None,
        time_to_target_s=reached[1] if reached else None, epochs_to_target=reached[2] if reached else None,
        evals=tuple(evals),
    )  # fmt: skip
    noise = ds_spngd.noise_scale_stats(engine)  # empty unless "gradient_noise_scale" is enabled and measurable
    if noise:
        settings["noise_scale_B_simple"] = noise["B_simple"]
    if noise_at_target is not None:
        settings["noise_scale_B_simple_at_target"] = noise_at_target
    if rank == 0:
        write_result(out_dir / "result.json", result, extra=settings)
        print(format_table(result, extra={k: str(v) for k, v in settings.items()}), flush=True)
        summary = {k: v for k, v in result.to_json_dict().items() if k != "evals"}
        finish_wandb({**summary, **{k: v for k, v in settings.items() if k.startswith("noise_scale_")}})
    return result


if __name__ == "__main__":
    main()
    finish_ranks()
