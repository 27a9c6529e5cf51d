"""Language-model training under DeepSpeed: GPT on the complete Shakespeare, any optimizer the JSON selects.

Usage::

    deepspeed --num_gpus 2 train_lm.py --deepspeed_config ds_configs/spngd_gpt.json [--model gpt|hf-gpt2]
        [--tokenizer bpe|char] [--vocab 8192] [--context 64] [--n-layer 4 --n-head 4 --n-embd 128] [--norm rms|layer]
        [--global-batch B] [--max-steps N | --epochs E] [--eval-interval K] [--eval-windows W] [--target-loss L]
        [--stop-at-target] [--lr LR] [--adam-lr LR] [--warmup-steps S] [--param-groups split|single]
        [--out-dir runs/NAME] [--seed S]

Conventions are train.py's: the JSON is read here, batch sizes / ``"auto"`` scheduler fields are resolved (the LR
schedule spans the run's ``total`` steps: ``--max-steps``, or ``--epochs`` of the train windows), and the dict goes to
``ds_spngd.initialize`` (SP-NGD or any DeepSpeed optimizer). Data order is one shared permutation of the training
windows per epoch (:mod:`ds_spngd_lab.data.text`, :mod:`ds_spngd_lab.data.sampler`): the same ``--seed`` gives every
optimizer the same batches. Each optimizer step runs ``gradient_accumulation_steps`` micro-batches of
``forward -> engine.backward -> engine.step``; the loss is the mean token cross-entropy (nats). Validation loss (mean
over the tokens of a fixed subset of validation windows, sharded over ranks) is evaluated at step 0, every
``--eval-interval`` steps and at the end; evaluation time is excluded from the training wall time. Parameters are
split into decay / no-decay groups (biases, norms and embeddings do not decay); ``--param-groups single`` (or a JSON
weight decay of 0, where the split makes no difference) passes one group. ``--lr`` sets ``optimizer.params.lr``; for
DeepSpeed's ``"Muon"`` it also sets ``muon_lr`` (the LR of the orthogonalized ≥2-D weights, which overrides ``lr``
there), and ``--adam-lr`` sets ``adam_lr`` (the LR of Muon's AdamW half: embeddings, head, norms; Muon only). With the
JSON's ``"gradient_noise_scale"`` section (ZeRO stage 0, 2+ ranks) ``result.json`` also holds the final B_simple
(``noise_scale_B_simple``) and its value at the evaluation that first reached ``--target-loss``
(``noise_scale_B_simple_at_target``; :mod:`ds_spngd.integrations.deepspeed.noise_scale`). The JSON's
``"adversarial"`` section trains on clean + adversarial examples, plain or ConAdv (:mod:`ds_spngd_lab.adversarial`),
with the perturbation added to the token embedding's output (``site`` defaults to :data:`EMBED_SITES` of the
model). Rank 0 writes
``steps.csv`` (step, samples = sequences, train loss, lr, wall time) and ``result.json`` (validation curve, per-step
times, peak RSS of every rank) to ``--out-dir`` and prints a result table.

The loop, the step log and the result type and table are the lab's (:mod:`ds_spngd_lab.loop`,
:mod:`ds_spngd_lab.results`), shared with train.py; this script holds the command line, the data, the model and the
validation loss's wiring (:mod:`ds_spngd_lab.evaluation`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F

import ds_spngd
from ds_spngd_lab.adversarial import AdversarialConfig, AdversarialStep, AdversarialTask, parse_adversarial
from ds_spngd_lab.data.sampler import BatchPlan
from ds_spngd_lab.data.text import EvalWindows, TextData, TokenWindows, load_text_data
from ds_spngd_lab.evaluation import validation_loss
from ds_spngd_lab.loop import (
    VAL_LOSS,
    LoopPlan,
    TrainingLoop,
    build_engine,
    engine_dtype,
    optimizer_type,
    read_ds_config,
    report_run,
)
from ds_spngd_lab.models.gpt import LM_NAMES, build_lm, lm_logits, param_groups
from ds_spngd_lab.ranks import finish_ranks, peak_rss_mib, start_ranks
from ds_spngd_lab.results import LMResult, format_lm_table
from ds_spngd_lab.schedules.scaling import batch_layout, resolve_config

STEP_KEYS = ("total_num_steps", "total_iters")
EMBED_SITES = {"gpt": "tok_embed", "hf-gpt2": "transformer.wte"}  # token embedding: the adversarial site


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
    p.add_argument("--lr", type=float, default=None, help="override optimizer.params.lr (Muon: and muon_lr)")
    p.add_argument("--adam-lr", type=float, default=None, help="override Muon's adam_lr (its AdamW half's LR)")
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
                 "eval_interval", "eval_windows", "eval_batch", "lr", "adam_lr", "warmup_steps"):  # fmt: skip
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
    """Copy of the JSON with ``--lr`` / ``--adam-lr`` / ``--warmup-steps`` applied and ``"auto"`` step counts set to the
    run length. For ``"type": "Muon"`` ``--lr`` sets ``muon_lr`` as well as ``lr`` (DeepSpeed gives the Muon half
    ``muon_lr`` when present) and ``--adam-lr`` sets ``adam_lr``; ``--adam-lr`` on another optimizer is an error."""
    cfg = json.loads(json.dumps(raw))
    is_muon = optimizer_type(cfg).lower() == "muon"
    if args.lr is not None or args.adam_lr is not None:
        if not isinstance(cfg.get("optimizer"), dict):
            raise ValueError("--lr / --adam-lr need an 'optimizer' section in the DeepSpeed config")
        if args.adam_lr is not None and not is_muon:
            raise ValueError("--adam-lr applies to DeepSpeed's Muon only (its AdamW half)")
        opt_params = cfg["optimizer"].setdefault("params", {})
        if args.lr is not None:
            opt_params["lr"] = args.lr
            if is_muon:
                opt_params["muon_lr"] = args.lr
        if args.adam_lr is not None:
            opt_params["adam_lr"] = args.adam_lr
    params = cfg.get("scheduler", {}).get("params", {}) if isinstance(cfg.get("scheduler"), dict) else {}
    if args.warmup_steps is not None:
        if "warmup_num_steps" not in params:
            raise ValueError("--warmup-steps needs scheduler.params.warmup_num_steps in the DeepSpeed config")
        params["warmup_num_steps"] = args.warmup_steps
    for key in STEP_KEYS:
        if params.get(key) == "auto":
            params[key] = total_steps
    return cfg



DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def lm_adversarial(cfg: AdversarialConfig, model: str, engine: Any, vocab: int) -> AdversarialStep | None:
    """The adversarial step of an enabled section (None otherwise): perturbation of the token embedding's output
    (``site`` or the model's :data:`EMBED_SITES` entry), loss = mean token cross-entropy (fp32 logits)."""
    if not cfg.enabled:
        return None
    if cfg.site is None:
        cfg = cfg.model_copy(update={"site": EMBED_SITES[model]})

    def criterion(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().reshape(-1, vocab), y.to(engine.device).reshape(-1), ignore_index=-100)

    return AdversarialStep(cfg, engine, AdversarialTask(lambda x: x.to(engine.device), criterion, lm_logits))


def build_engine_for(args: argparse.Namespace, vocab: int, config: dict[str, Any]) -> tuple[Any, bool, int, bool]:
    """Seed, build ``--model`` and its DeepSpeed engine with decay / no-decay parameter groups (one group with
    ``--param-groups single`` or an explicit JSON weight decay of 0).

    Returns:
        ``(engine, skips_nonfinite, parameter count, single group)``.
    """
    torch.manual_seed(args.seed)
    model = build_lm(args.model, vocab, args.n_layer, args.n_head, args.n_embd, args.context, args.dropout, args.norm)
    opt_params = config.get("optimizer", {}).get("params", {})
    # an explicit weight decay of 0 makes the split pointless (a missing key may mean the optimizer's own default)
    single = args.param_groups == "single" or opt_params.get("weight_decay", None) in (0, 0.0)
    groups: Any = list(model.parameters()) if single else param_groups(model)
    engine, skips_nonfinite = build_engine(args, model, groups, config)
    return engine, skips_nonfinite, sum(p.numel() for p in model.parameters()), single


def main(argv: list[str] | None = None) -> LMResult:
    """Train with the command line ``argv`` (None: ``sys.argv``) and return the run's result (on every rank)."""
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
    adv_cfg = parse_adversarial(config)  # before anything is built: a bad section fails fast, naming the key
    vocab = data.vocab_size
    engine, skips_nonfinite, n_params, single = build_engine_for(args, vocab, config)
    adversarial = lm_adversarial(adv_cfg, args.model, engine, vocab)

    out_dir = Path(args.out_dir or f"runs/{config_path.stem}_{args.model}_b{global_batch}_w{world}")
    zero = int((config.get("zero_optimization") or {}).get("stage", 0))
    opt_params = config.get("optimizer", {}).get("params", {})
    settings = {"model": args.model, "optimizer": optimizer_type(config), "config": str(config_path),
                "world_size": world, "global_batch": global_batch, "micro_batch": micro,
                "gradient_accumulation_steps": gas, "context": args.context, "tokenizer": args.tokenizer,
                "vocab": vocab, "data_key": data.key, "n_layer": args.n_layer, "n_head": args.n_head,
                "n_embd": args.n_embd, "norm": args.norm, "parameters": n_params, "steps_per_epoch": spe,
                "total_steps": total_steps, "eval_windows": len(eval_src), "seed": args.seed,
                "dtype": DTYPE_NAMES[engine_dtype(engine)], "zero_stage": zero,
                "param_groups": "single" if single else "split",
                "lr": opt_params.get("muon_lr", opt_params.get("lr")),
                "warmup_steps": config.get("scheduler", {}).get("params", {}).get("warmup_num_steps")}  # fmt: skip
    if "adam_lr" in opt_params:
        settings["adam_lr"] = opt_params["adam_lr"]
    if adversarial is not None:
        settings["adversarial"] = adversarial.cfg.describe()

    def forward_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = lm_logits(engine(x.to(engine.device)))
        return F.cross_entropy(logits.float().reshape(-1, vocab), y.to(engine.device).reshape(-1), ignore_index=-100)

    loop_plan = LoopPlan(total_steps=total_steps, steps_per_epoch=spe, global_batch=global_batch, micro_batches=gas,
                         eval_interval=args.eval_interval or max(1, total_steps // 10),
                         desc=f"{settings['optimizer']} {args.model}", target=args.target_loss,
                         stop_at_target=args.stop_at_target, eval_at_start=True, monitor_lr=False,
                         epoch_in_errors=False)  # fmt: skip
    noise_at_target: list[float | None] = []  # B_simple when the target was first reached (the final one can be ~0/0)
    loop = TrainingLoop(engine, loop_plan, VAL_LOSS, forward_loss,
                        lambda: validation_loss(engine, eval_src, rank, world, args.eval_batch),
                        rank=rank, world=world, skips_nonfinite=skips_nonfinite,
                        on_target=lambda _: noise_at_target.append(ds_spngd.noise_scale_stats(engine).get("B_simple")),
                        adversarial=adversarial)
    out = loop.run(train_src, out_dir / "steps.csv")

    step, reached = out.steps, out.reached
    result = LMResult(
        steps=step, epochs=step / spe, tokens=step * global_batch * args.context, wall_time_s=out.train_time_s,
        median_step_s=statistics.median(out.step_times) if out.step_times else float("nan"), val_loss=out.metric,
        final_loss=out.loss, target_loss=args.target_loss, steps_to_target=reached[0] if reached else None,
        time_to_target_s=reached[1] if reached else None, evals=tuple(out.evals),
        peak_rss_mib=tuple(peak_rss_mib(world)),
    )  # fmt: skip
    noise = ds_spngd.noise_scale_stats(engine)  # empty unless "gradient_noise_scale" is enabled and measurable
    if noise:
        settings["noise_scale_B_simple"] = noise["B_simple"]
    if noise_at_target and noise_at_target[0] is not None:
        settings["noise_scale_B_simple_at_target"] = noise_at_target[0]
    payload = {**settings, **result.to_json_dict(), "step_times_s": [round(t, 5) for t in out.step_times]}
    report_run(rank, out_dir / "result.json", payload, lambda: format_lm_table(result, settings))
    return result


if __name__ == "__main__":
    main()
    finish_ranks()
