"""Language-model training under DeepSpeed: GPT on the complete Shakespeare, any optimizer the JSON selects.

Usage::

    deepspeed --num_gpus 2 train_lm.py --deepspeed_config ds_configs/spngd_gpt.json [--model gpt|hf-gpt2]
        [--tokenizer bpe|char] [--vocab 8192] [--context 64] [--n-layer 4 --n-head 4 --n-embd 128] [--norm rms|layer]
        [--global-batch B] [--max-steps N | --epochs E] [--eval-interval K] [--eval-windows W] [--target-loss L]
        [--stop-at-target] [--lr LR] [--warmup-steps S] [--param-groups split|single] [--out-dir runs/NAME] [--seed S]

Conventions are train.py's: the JSON is read here, batch sizes / ``"auto"`` scheduler fields are resolved (the LR
schedule spans the run's ``total`` steps: ``--max-steps``, or ``--epochs`` of the train windows), and the dict goes to
``ds_spngd.initialize`` (SP-NGD or any DeepSpeed optimizer). Data order is one shared permutation of the training
windows per epoch (:mod:`ds_spngd_lab.data.text`, :mod:`ds_spngd_lab.data.sampler`): the same ``--seed`` gives every optimizer
the same batches. Each optimizer step runs ``gradient_accumulation_steps`` micro-batches of
``forward -> engine.backward -> engine.step``; the loss is the mean token cross-entropy (nats). Validation loss (mean
over the tokens of a fixed subset of validation windows, sharded over ranks) is evaluated at step 0, every
``--eval-interval`` steps and at the end; evaluation time is excluded from the training wall time. Parameters are
split into decay / no-decay groups (biases, norms and embeddings do not decay); ``--param-groups single`` (or a JSON
weight decay of 0, where the split makes no difference) passes one group. Rank 0 writes ``steps.csv`` (step, samples =
sequences, train loss, lr, wall time) and ``result.json`` (validation curve, per-step times, peak RSS of every rank)
to ``--out-dir`` and prints a result table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import ds_spngd
from ds_spngd_lab.data.sampler import BatchPlan
from ds_spngd_lab.data.text import EvalWindows, TextData, TokenWindows, load_text_data
from ds_spngd_lab.models.gpt import LM_NAMES, build_lm, lm_logits, param_groups
from ds_spngd_lab.run_log import StepLog, agreed_step_loss, finish_ranks, read_ds_config, render_table, start_ranks
from ds_spngd_lab.schedules.scaling import batch_layout, resolve_config

STEP_KEYS = ("total_num_steps", "total_iters")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line (DeepSpeed's ``--deepspeed_config`` etc. are added by ``deepspeed.add_config_arguments``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt", choices=LM_NAMES)
    p.add_argument("--tokenizer", default="bpe", choices=("bpe", "char"))
    p.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary size (char: the train split's characters)")
    p.add_argument("--context", type=int, default=64, help="tokens per training window T")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--norm", default="rms", choices=("rms", "layer"), help="norm of --model gpt")
    p.add_argument("--global-batch", type=int, default=None, help="override train_batch_size (sequences per step)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (the LR schedule's length)")
    p.add_argument("--epochs", type=float, default=None, help="training length in epochs of the train windows")
    p.add_argument("--eval-interval", type=int, default=None, help="evaluate every K steps (default: total / 10)")
    p.add_argument("--eval-windows", type=int, default=512, help="validation windows evaluated (fixed subset)")
    p.add_argument("--eval-batch", type=int, default=64, help="validation windows per forward")
    p.add_argument("--target-loss", type=float, default=None, help="report steps/time to this validation loss")
    p.add_argument("--stop-at-target", action="store_true", help="stop once --target-loss is reached")
    p.add_argument("--lr", type=float, default=None, help="override optimizer.params.lr")
    p.add_argument("--warmup-steps", type=int, default=None, help="override scheduler.params.warmup_num_steps")
    p.add_argument("--param-groups", default="split", choices=("split", "single"),
                   help="split: decay / no-decay groups; single: one group (weight decay on everything)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="validation tail of every text")
    p.add_argument("--cache-dir", default=None, help="tokenizer/token cache (default $DS_SPNGD_CACHE or "
                                                     "~/.cache/ds_spngd)")  # fmt: skip
    p.add_argument("--corpus-dir", default=None, help="folder of .txt texts instead of the installed Shakespeare")
    p.add_argument("--out-dir", default=None, help="output folder (default runs/<config>_<model>_b<B>_w<world>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    if args.deepspeed_config is None:
        p.error("--deepspeed_config is required")
    for name in ("vocab", "context", "n_layer", "n_head", "n_embd", "global_batch", "max_steps", "epochs",
                 "eval_interval", "eval_windows", "eval_batch", "lr", "warmup_steps"):  # fmt: skip
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.n_embd % args.n_head:
        p.error(f"--n-embd ({args.n_embd}) must be divisible by --n-head ({args.n_head})")
    return args


def load_data(args: argparse.Namespace, rank: int, world: int) -> TextData:
    """Rank 0 trains/tokenizes (or reads the cache) first; the others then read the cache it wrote."""
    def load() -> TextData:
        return load_text_data(args.tokenizer, args.vocab, args.val_fraction, args.cache_dir, args.corpus_dir)

    data = load() if rank == 0 else None
    if world > 1:
        dist.barrier()
    return data if data is not None else load()


def schedule_config(raw: dict[str, Any], args: argparse.Namespace, total_steps: int) -> dict[str, Any]:
    """Copy of the JSON with ``--lr`` / ``--warmup-steps`` applied and ``"auto"`` step counts set to the run length."""
    cfg = json.loads(json.dumps(raw))
    if args.lr is not None:
        if not isinstance(cfg.get("optimizer"), dict):
            raise ValueError("--lr needs an 'optimizer' section in the DeepSpeed config")
        cfg["optimizer"].setdefault("params", {})["lr"] = args.lr
    params = cfg.get("scheduler", {}).get("params", {}) if isinstance(cfg.get("scheduler"), dict) else {}
    if args.warmup_steps is not None:
        if "warmup_num_steps" not in params:
            raise ValueError("--warmup-steps needs scheduler.params.warmup_num_steps in the DeepSpeed config")
        params["warmup_num_steps"] = args.warmup_steps
    for key in STEP_KEYS:
        if params.get(key) == "auto":
            params[key] = total_steps
    return cfg


@torch.no_grad()
def evaluate(engine: Any, source: EvalWindows, rank: int, world: int, batch: int) -> float:
    """Mean validation cross-entropy per token (nats) over ``source``'s windows (each rank its shard, sums reduced)."""
    engine.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    for x, y in source.batches(rank, world, batch):
        logits = lm_logits(engine(x.to(engine.device)))
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.to(engine.device).reshape(-1),
                               reduction="sum")  # fmt: skip
        sums += torch.tensor([float(loss), y.numel()], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    engine.train()
    if sums[1] == 0:
        raise RuntimeError("the validation subset is empty")
    return float(sums[0] / sums[1])


def peak_rss_mib(world: int) -> list[float]:
    """Peak resident memory (``ru_maxrss``, MiB) of every rank's process, gathered onto all ranks."""
    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    if world == 1:
        return [mine]
    vec = torch.zeros(world, dtype=torch.float64)
    vec[dist.get_rank()] = mine
    dist.all_reduce(vec, op=dist.ReduceOp.SUM)
    return [float(v) for v in vec]


@dataclass(frozen=True)
class LMResult:
    """Outcome of one language-model run (``result.json`` holds these keys plus the run's settings).

    Attributes:
        steps: optimizer steps taken. epochs: ``steps / steps_per_epoch``. tokens: training tokens consumed.
        wall_time_s: training wall time (s), evaluation excluded. median_step_s: median time of one optimizer step.
        val_loss: last validation loss (nats/token). final_loss: mean training loss of the last step.
        target_loss / steps_to_target / time_to_target_s: first evaluation at or below ``target_loss`` (None: not
        set or not reached). evals: ``(step, training wall time s, validation loss)`` per evaluation, step 0 first.
        peak_rss_mib: peak resident memory per rank (MiB, index = rank).
    """

    steps: int
    epochs: float
    tokens: int
    wall_time_s: float
    median_step_s: float
    val_loss: float
    final_loss: float
    target_loss: float | None
    steps_to_target: int | None
    time_to_target_s: float | None
    evals: tuple[tuple[int, float, float], ...]
    peak_rss_mib: tuple[float, ...]

    def to_json_dict(self) -> dict[str, Any]:
        """Plain dict (non-finite floats become None; tuples become lists)."""
        out = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}
        out["evals"] = [list(e) for e in self.evals]
        out["peak_rss_mib"] = list(self.peak_rss_mib)
        return out


def format_lm_table(result: LMResult, extra: dict[str, Any]) -> str:
    """Aligned two-column text table of the settings ``extra`` and ``result``."""
    target = "-"
    if result.target_loss is not None:
        target = ("not reached" if result.steps_to_target is None or result.time_to_target_s is None
                  else f"{result.steps_to_target} steps, {result.time_to_target_s:.1f} s")  # fmt: skip
    rows = [(k, str(v)) for k, v in extra.items()] + [
        ("steps", str(result.steps)), ("epochs", f"{result.epochs:.3f}"), ("tokens", str(result.tokens)),
        ("train wall time", f"{result.wall_time_s:.1f} s (eval excluded)"),
        ("median step time", f"{result.median_step_s:.3f} s"),
        ("final train loss", f"{result.final_loss:.4f}"),
        ("validation loss", f"{result.val_loss:.4f} (ppl {math.exp(min(result.val_loss, 50)):.1f})"),
        (f"to val loss {result.target_loss}" if result.target_loss is not None else "target", target),
        ("peak RSS per rank", ", ".join(f"{m:.0f} MiB" for m in result.peak_rss_mib)),
    ]  # fmt: skip
    return render_table(rows)


def main(argv: list[str] | None = None) -> LMResult:
    args = parse_args(argv)
    rank, world = start_ranks()
    config_path, raw = read_ds_config(args)
    data = load_data(args, rank, world)
    layout_only = {k: v for k, v in raw.items() if k != "scheduler"}  # batch sizes do not depend on the schedule
    global_batch, micro, gas = batch_layout(resolve_config(layout_only, args.global_batch, 1, 1.0, world), world)
    plan = BatchPlan(rank=rank, world=world, micro_batch=micro, gas=gas, seed=args.seed)
    train_src = TokenWindows(data.train, args.context, plan)
    eval_src = EvalWindows(data.val, args.context, args.eval_windows)
    spe = train_src.steps_per_epoch
    total_steps = math.ceil(args.epochs * spe) if args.epochs is not None else args.max_steps or spe
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    config = resolve_config(schedule_config(raw, args, total_steps), global_batch, spe, total_steps / spe, world)

    torch.manual_seed(args.seed)
    vocab = data.vocab_size
    model = build_lm(args.model, vocab, args.n_layer, args.n_head, args.n_embd, args.context, args.dropout, args.norm)
    opt_params = config.get("optimizer", {}).get("params", {})
    # an explicit weight decay of 0 makes the split pointless (a missing key may mean the optimizer's own default)
    single = args.param_groups == "single" or opt_params.get("weight_decay", None) in (0, 0.0)
    groups: Any = list(model.parameters()) if single else param_groups(model)
    engine, _, _, _ = ds_spngd.initialize(args=args, model=model, model_parameters=groups, config=config)
    spngd = ds_spngd.get_spngd(engine)
    skips_nonfinite = spngd is not None and spngd.cfg.nonfinite == "skip"

    eval_interval = args.eval_interval or max(1, total_steps // 10)
    out_dir = Path(args.out_dir or f"runs/{config_path.stem}_{args.model}_b{global_batch}_w{world}")
    optimizer_type = str(config.get("optimizer", {}).get("type", "client"))
    dtype = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    zero = int((config.get("zero_optimization") or {}).get("stage", 0))
    settings = {"model": args.model, "optimizer": optimizer_type, "config": str(config_path), "world_size": world,
                "global_batch": global_batch, "micro_batch": micro, "gradient_accumulation_steps": gas,
                "context": args.context, "tokenizer": args.tokenizer, "vocab": vocab, "data_key": data.key,
                "n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd, "norm": args.norm,
                "parameters": sum(p.numel() for p in model.parameters()), "steps_per_epoch": spe,
                "total_steps": total_steps, "eval_windows": len(eval_src), "seed": args.seed, "dtype": dtype,
                "zero_stage": zero, "param_groups": "single" if single else "split",
                "lr": opt_params.get("lr"), "warmup_steps": config.get("scheduler", {}).get("params", {}).get(
                    "warmup_num_steps")}  # fmt: skip

    log = StepLog(out_dir / "steps.csv", enabled=rank == 0)
    bar = tqdm(total=total_steps, disable=rank != 0, desc=f"{optimizer_type} {args.model}", unit="step",
               mininterval=1.0)  # fmt: skip
    monitor = engine.monitor if getattr(engine, "monitor", None) is not None and engine.monitor.enabled else None
    val = evaluate(engine, eval_src, rank, world, args.eval_batch)
    evals: list[tuple[int, float, float]] = [(0, 0.0, val)]
    reached: tuple[int, float] | None = None
    step_times: list[float] = []
    train_time, loss_value = 0.0, float("nan")
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
            logits = lm_logits(engine(x.to(engine.device)))
            loss = F.cross_entropy(logits.float().reshape(-1, vocab), y.to(engine.device).reshape(-1),
                                   ignore_index=-100)  # fmt: skip
            engine.backward(loss)
            loss_sum += loss.detach().double().cpu()
            if micro_idx == gas - 1:  # before the boundary step: agree on finiteness across ranks
                loss_value = agreed_step_loss(loss_sum, gas, world, step, not skips_nonfinite)
            engine.step()
        step += 1
        step_times.append(time.perf_counter() - t0)
        train_time += step_times[-1]
        log.write(step, step * global_batch, loss_value, lr, train_time)
        if monitor is not None:
            monitor.write_events([("Train/loss", loss_value, engine.global_samples)])
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{val:.3f}", refresh=False)
        if step % eval_interval == 0 or step == total_steps:
            val = evaluate(engine, eval_src, rank, world, args.eval_batch)
            evals.append((step, train_time, val))
            if monitor is not None:
                monitor.write_events([("Val/loss", val, engine.global_samples)])
            if args.target_loss is not None and reached is None and val <= args.target_loss:
                reached = (step, train_time)
                if args.stop_at_target:
                    break
    bar.close()
    log.close()

    result = LMResult(
        steps=step, epochs=step / spe, tokens=step * global_batch * args.context, wall_time_s=train_time,
        median_step_s=statistics.median(step_times) if step_times else float("nan"), val_loss=val,
        final_loss=loss_value, target_loss=args.target_loss, steps_to_target=reached[0] if reached else None,
        time_to_target_s=reached[1] if reached else None, evals=tuple(evals), peak_rss_mib=tuple(peak_rss_mib(world)),
    )  # fmt: skip
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        payload = {**settings, **result.to_json_dict(), "step_times_s": [round(t, 5) for t in step_times]}
        (out_dir / "result.json").write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        print(format_lm_table(result, settings), flush=True)
    return result


if __name__ == "__main__":
    main()
    finish_ranks()
