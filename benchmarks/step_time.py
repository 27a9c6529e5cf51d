"""Per-step time of SP-NGD over a first-order baseline (momentum SGD, or AdamW for GPT-2) on the same model, batch and
data (side by side, interleaved).

Usage:
    python benchmarks/step_time.py [--config ds_configs/spngd.json] [--model cnn4] [--batch 512] [--repeats 5]
        [--device cpu|cuda] [--amp none|bf16] [--image-size S] [--threads T] [--baseline sgd|adamw]

    python benchmarks/step_time.py --device cuda --model resnet18 --batch 256
    python benchmarks/step_time.py --device cuda --model resnet50 --batch 128
    python benchmarks/step_time.py --device cuda --amp bf16 --model gpt2-small --batch 8 --context 1024

Each repeat times one window of baseline steps and one window of SP-NGD steps on the same inputs (the window is a
multiple of the config's factor_update_steps and inv_update_steps, so it holds the amortized share of factor
refreshes and inversions). Windows alternate baseline/SP-NGD to cancel machine drift. Prints, over repeats, the
min/median/max of the amortized ratio, and the ratios of refresh steps and plain steps alone, then the absolute
ms/step of each optimizer.
One process and one thread: on the MNIST job each of the 2 ranks runs one thread, and the factor reduction's
communication is a separate cost (benchmarks/comm_modes.py is the place for it).

Models: ``mlp``, ``cnn``, ``cnn4`` take MNIST-shaped input (1×28×28, 10 classes); ``resnet18`` / ``resnet50`` take
ImageNet-shaped input (3×224×224, 1000 classes; ``--image-size`` shrinks it, ≥ 32, e.g. for a CPU smoke run).
``gpt2-small`` is Hugging Face's GPT-2 small (vocabulary 50257, 12 layers, width 768, 12 heads, tied head) on random
token windows of ``--context`` tokens (default 1024), ``--batch`` sequences per step, next-token cross-entropy; its
defaults are ``--config ds_configs/spngd_gpt.json`` and ``--baseline adamw`` (AdamW with
``ds_configs/adamw_gpt.json``'s lr, betas, eps and weight decay on every parameter); ``--vocab``, ``--n-layer``,
``--n-embd``, ``--n-head`` shrink it for a CPU smoke run. The baseline ``sgd`` is torch's SGD with the SP-NGD
config's lr and momentum.
``--device cuda`` times with ``torch.cuda.synchronize()`` before and after every step (GPU work is asynchronous)
and lets cuDNN pick its fastest algorithms (``cudnn.benchmark``) for both optimizers alike; ``--amp bf16`` runs
forward and loss under ``torch.autocast(dtype=bfloat16)`` (SP-NGD's factors and inverses stay fp32).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ds_spngd import SPNGD
from ds_spngd.config import SPNGDConfig, parse_spngd_params
from ds_spngd_lab.models import MODEL_NAMES, build_model

IMAGENET_MODELS = ("resnet18", "resnet50")
LM_MODELS = ("gpt2-small",)
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
StepFn = Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor], float]


def input_spec(model: str, image_size: int | None) -> tuple[int, int, int]:
    """(in_channels, image side, classes) of an image model's benchmark input."""
    if model.lower() in IMAGENET_MODELS:
        return 3, image_size or 224, 1000
    return 1, image_size or 28, 10


def image_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``model(x)`` (N × classes logits) against ``y`` (N)."""
    return F.cross_entropy(model(x), y)


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a language model: x, y are N × T token ids, the logits N × T × V (fp32)."""
    from ds_spngd_lab.models.gpt import lm_logits

    logits = lm_logits(model(x))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def make_step(device: torch.device, amp: str, loss_fn: LossFn = image_loss) -> StepFn:
    """The timed training step: zero_grad, forward, loss, backward, optimizer step; returns seconds.

    On CUDA the clock starts and stops after ``torch.cuda.synchronize()``, so the step's kernels are inside it and
    no earlier work is.
    """
    cuda = device.type == "cuda"

    def autocast() -> contextlib.AbstractContextManager[object]:
        if amp == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    return step


@dataclass
class Problem:
    """Two copies of one model (same weights), one batch, its loss and a one-line description of the input."""

    baseline_model: nn.Module
    ngd_model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    loss_fn: LossFn
    describe: str


def build_problem(args: argparse.Namespace, device: torch.device) -> Problem:
    """The models and the batch of ``args`` (seed 0): image classification or GPT-2 on random tokens."""
    torch.manual_seed(0)
    if args.model in LM_MODELS:
        from ds_spngd_lab.models.gpt import build_hf_gpt2

        def lm() -> nn.Module:
            return build_hf_gpt2(args.vocab, args.n_layer, args.n_head, args.n_embd, args.context)

        base = lm().to(device)
        x = torch.randint(0, args.vocab, (args.batch, args.context)).to(device)
        y = torch.randint(0, args.vocab, (args.batch, args.context)).to(device)
        ngd = lm().to(device)
        ngd.load_state_dict(base.state_dict())
        return Problem(base, ngd, x, y, lm_loss, f"tokens={args.batch}x{args.context} vocab={args.vocab} "
                       f"layers={args.n_layer} width={args.n_embd} heads={args.n_head}")
    channels, side, classes = input_spec(args.model, args.image_size)
    x = torch.randn(args.batch, channels, side, side).to(device)
    y = torch.randint(0, classes, (args.batch,)).to(device)
    base = build_model(args.model, classes, channels, image_size=side).to(device)
    ngd = build_model(args.model, classes, channels, image_size=side).to(device)
    ngd.load_state_dict(base.state_dict())
    return Problem(base, ngd, x, y, image_loss, f"input={channels}x{side}x{side}")


def baseline_optimizer(args: argparse.Namespace, model: nn.Module, cfg: SPNGDConfig) -> torch.optim.Optimizer:
    """Momentum SGD with the SP-NGD config's lr and momentum, or AdamW with ``--baseline-config``'s params."""
    if args.baseline == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    p: dict[str, Any] = json.loads(Path(args.baseline_config).read_text())["optimizer"]["params"]
    return torch.optim.AdamW(model.parameters(), lr=p.get("lr", 1e-3), betas=tuple(p.get("betas", (0.9, 0.999))),
                             eps=p.get("eps", 1e-8), weight_decay=p.get("weight_decay", 0.01))


def time_windows(args: argparse.Namespace, device: torch.device, cfg: SPNGDConfig,
                 prob: Problem) -> tuple[int, dict[str, list[float]]]:
    """Warm both optimizers up, then ``--repeats`` interleaved windows: the window length in steps and, per repeat,
    the ratios and ms per step."""
    step = make_step(device, args.amp, prob.loss_fn)
    period = math.lcm(cfg.factor_update_steps, cfg.inv_update_steps)
    window = period * max(1, math.ceil(args.window_steps / period))
    base_opt = baseline_optimizer(args, prob.baseline_model, cfg)
    ngd = SPNGD(prob.ngd_model.parameters(), model=prob.ngd_model, config=cfg)
    x, y = prob.x, prob.y
    for _ in range(2 if device.type == "cpu" else 5):  # warm-up: allocator, cuDNN autotuning
        step(prob.baseline_model, base_opt, x, y)
    for _ in range(period if device.type == "cpu" else 2 * period):  # warm-up: first inversion
        step(prob.ngd_model, ngd, x, y)
    out: dict[str, list[float]] = {k: [] for k in ("amortized", "refresh", "plain", "ms_base", "ms_ngd",
                                                   "ms_refresh", "ms_plain")}
    for _ in range(args.repeats):
        t_base = [step(prob.baseline_model, base_opt, x, y) for _ in range(window)]
        t_ngd = []
        for _ in range(window):
            was_refresh = ngd.steps % cfg.factor_update_steps == 0
            t_ngd.append((step(prob.ngd_model, ngd, x, y), was_refresh))
        base_mean = statistics.fmean(t_base)
        t_refresh = [t for t, r in t_ngd if r]
        t_plain = [t for t, r in t_ngd if not r] or [math.nan]
        out["amortized"].append(statistics.fmean(t for t, _ in t_ngd) / base_mean)
        out["refresh"].append(statistics.fmean(t_refresh) / statistics.median(t_base))
        out["plain"].append(statistics.fmean(t_plain) / statistics.median(t_base))
        out["ms_base"].append(1e3 * base_mean)
        out["ms_ngd"].append(1e3 * statistics.fmean(t for t, _ in t_ngd))
        out["ms_refresh"].append(1e3 * statistics.fmean(t_refresh))
        out["ms_plain"].append(1e3 * statistics.fmean(t_plain))
    return window, out


def print_results(args: argparse.Namespace, device: torch.device, cfg: SPNGDConfig, prob: Problem, window: int,
                  res: dict[str, list[float]]) -> None:
    """The header line and the ratio / ms tables (min, median, max over repeats)."""
    name = "SGD" if args.baseline == "sgd" else "AdamW"

    def row(label: str, vals: list[float], spec: str = "6.3f", width: int = 6) -> str:
        return f"{label:<34} " + " ".join(f"{v:{spec}}" for v in (min(vals), statistics.median(vals), max(vals)))

    header = (f"model={args.model} batch={args.batch} threads={args.threads} window={window} steps "
              f"baseline={args.baseline} config={args.config} "
              f"factor_update_steps={cfg.factor_update_steps} inv_update_steps={cfg.inv_update_steps} "
              f"factor_sample_fraction={cfg.factor_sample_fraction} inverse_method={cfg.inverse_method}")
    if device.type == "cuda":
        header += f" device=cuda ({torch.cuda.get_device_name(device)})"
    print(header + f" amp={args.amp} {prob.describe}")
    print(f"{'SP-NGD / ' + name + ' step time':<34} {'min':>6} {'median':>6} {'max':>6}")
    print(row("amortized (all steps)", res["amortized"]))
    print(row("factor-refresh steps", res["refresh"]))
    print(row("other steps", res["plain"]))
    print(f"{'ms per step (window means)':<34} {'min':>9} {'median':>9} {'max':>9}")
    print(row(name, res["ms_base"], "9.2f"))
    print(row("SP-NGD amortized (all steps)", res["ms_ngd"], "9.2f"))
    print(row("SP-NGD factor-refresh steps", res["ms_refresh"], "9.2f"))
    print(row("SP-NGD other steps", res["ms_plain"], "9.2f"))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="SP-NGD config (default ds_configs/spngd.json; "
                    "ds_configs/spngd_gpt.json for gpt2-small)")
    ap.add_argument("--model", default="cnn4", choices=(*MODEL_NAMES, *LM_MODELS))
    ap.add_argument("--batch", type=int, default=512, help="examples (sequences) per step (one rank's micro-batch)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--window-steps", type=int, default=10, help="at least this many steps per window (rounded up "
                    "to a whole refresh/inversion period)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--amp", choices=("none", "bf16"), default="none", help="autocast forward + loss to bf16")
    ap.add_argument("--image-size", type=int, default=None,
                    help="input side (default 28 for mlp/cnn/cnn4, 224 for resnet18/resnet50)")
    ap.add_argument("--baseline", choices=("sgd", "adamw"), default=None, help="default sgd; adamw for gpt2-small")
    ap.add_argument("--baseline-config", default="ds_configs/adamw_gpt.json", help="AdamW's params")
    lm = ap.add_argument_group("gpt2-small sizes (GPT-2 small by default)")
    lm.add_argument("--context", type=int, default=1024, help="tokens per sequence")
    lm.add_argument("--vocab", type=int, default=50257)
    lm.add_argument("--n-layer", type=int, default=12)
    lm.add_argument("--n-embd", type=int, default=768)
    lm.add_argument("--n-head", type=int, default=12)
    args = ap.parse_args()
    gpt = args.model in LM_MODELS
    args.config = args.config or ("ds_configs/spngd_gpt.json" if gpt else "ds_configs/spngd.json")
    args.baseline = args.baseline or ("adamw" if gpt else "sgd")
    if min(args.batch, args.repeats, args.threads, args.window_steps, args.context, args.vocab) < 1:
        ap.error("--batch, --repeats, --threads, --window-steps, --context and --vocab must be positive")
    if args.image_size is not None and args.image_size < (32 if args.model in IMAGENET_MODELS else 1):
        ap.error(f"--image-size {args.image_size} is too small for {args.model}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is false")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg = parse_spngd_params(json.loads(Path(args.config).read_text())["optimizer"]["params"])
    prob = build_problem(args, device)
    print_results(args, device, cfg, prob, *time_windows(args, device, cfg, prob))


if __name__ == "__main__":
    main()
