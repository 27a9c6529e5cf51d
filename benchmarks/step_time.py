"""Per-step time of SP-NGD over momentum SGD on the same model, batch and data (side by side, interleaved).

Usage:
    python benchmarks/step_time.py [--config ds_configs/spngd.json] [--model cnn4] [--batch 512] [--repeats 5]
        [--device cpu|cuda] [--amp none|bf16] [--image-size S] [--threads T]

    python benchmarks/step_time.py --device cuda --model resnet18 --batch 256
    python benchmarks/step_time.py --device cuda --model resnet50 --batch 128

Each repeat times one window of SGD steps and one window of SP-NGD steps on the same inputs (the window is a
multiple of the config's factor_update_steps and inv_update_steps, so it holds the amortized share of factor
refreshes and inversions). Windows alternate SGD/SP-NGD to cancel machine drift. Prints, over repeats, the
min/median/max of the amortized ratio, and the ratios of refresh steps and plain steps alone, then the absolute
ms/step of each optimizer.
One process and one thread: on the MNIST job each of the 2 ranks runs one thread, and the factor reduction's
communication is a separate cost (benchmarks/comm is the place for it).

Models: ``mlp``, ``cnn``, ``cnn4`` take MNIST-shaped input (1×28×28, 10 classes); ``resnet18`` / ``resnet50`` take
ImageNet-shaped input (3×224×224, 1000 classes; ``--image-size`` shrinks it, ≥ 32, e.g. for a CPU smoke run).
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
from pathlib import Path

import torch
import torch.nn.functional as F

from ds_spngd import SPNGD
from ds_spngd.config import parse_spngd_params
from ds_spngd_lab.models import MODEL_NAMES, build_model

IMAGENET_MODELS = ("resnet18", "resnet50")


def input_spec(model: str, image_size: int | None) -> tuple[int, int, int]:
    """(in_channels, image side, classes) of a model's benchmark input."""
    if model.lower() in IMAGENET_MODELS:
        return 3, image_size or 224, 1000
    return 1, image_size or 28, 10


def make_step(device: torch.device, amp: str) -> Callable[[torch.nn.Module, torch.optim.Optimizer, torch.Tensor,
                                                          torch.Tensor], float]:
    """The timed training step: zero_grad, forward, loss, backward, optimizer step; returns seconds.

    On CUDA the clock starts and stops after ``torch.cuda.synchronize()``, so the step's kernels are inside it and
    no earlier work is.
    """
    cuda = device.type == "cuda"

    def autocast() -> contextlib.AbstractContextManager[object]:
        if amp == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="ds_configs/spngd.json")
    ap.add_argument("--model", default="cnn4", choices=MODEL_NAMES)
    ap.add_argument("--batch", type=int, default=512, help="examples per step (one rank's micro-batch)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--amp", choices=("none", "bf16"), default="none", help="autocast forward + loss to bf16")
    ap.add_argument("--image-size", type=int, default=None,
                    help="input side (default 28 for mlp/cnn/cnn4, 224 for resnet18/resnet50)")
    args = ap.parse_args()
    if args.batch < 1 or args.repeats < 1 or args.threads < 1:
        ap.error("--batch, --repeats and --threads must be positive")
    if args.image_size is not None and args.image_size < (32 if args.model in IMAGENET_MODELS else 1):
        ap.error(f"--image-size {args.image_size} is too small for {args.model}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is false")
    torch.set_num_threads(args.threads)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    step = make_step(device, args.amp)

    cfg = parse_spngd_params(json.loads(Path(args.config).read_text())["optimizer"]["params"])
    period = math.lcm(cfg.factor_update_steps, cfg.inv_update_steps)
    window = period * max(1, math.ceil(10 / period))
    channels, side, classes = input_spec(args.model, args.image_size)
    torch.manual_seed(0)
    x = torch.randn(args.batch, channels, side, side).to(device)
    y = torch.randint(0, classes, (args.batch,)).to(device)

    sgd_model = build_model(args.model, classes, channels, image_size=side).to(device)
    ngd_model = build_model(args.model, classes, channels, image_size=side).to(device)
    ngd_model.load_state_dict(sgd_model.state_dict())
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    ngd = SPNGD(ngd_model.parameters(), model=ngd_model, config=cfg)
    for _ in range(2 if device.type == "cpu" else 5):  # warm-up: allocator, cuDNN autotuning
        step(sgd_model, sgd, x, y)
    for _ in range(period if device.type == "cpu" else 2 * period):  # warm-up: first inversion
        step(ngd_model, ngd, x, y)

    amortized, refresh, plain = [], [], []
    ms_sgd, ms_ngd, ms_refresh, ms_plain = [], [], [], []
    for _ in range(args.repeats):
        t_sgd = [step(sgd_model, sgd, x, y) for _ in range(window)]
        t_ngd = []
        for _ in range(window):
            was_refresh = ngd.steps % cfg.factor_update_steps == 0
            t_ngd.append((step(ngd_model, ngd, x, y), was_refresh))
        sgd_mean = statistics.fmean(t_sgd)
        t_refresh = [t for t, r in t_ngd if r]
        t_plain = [t for t, r in t_ngd if not r] or [math.nan]
        amortized.append(statistics.fmean(t for t, _ in t_ngd) / sgd_mean)
        refresh.append(statistics.fmean(t_refresh) / statistics.median(t_sgd))
        plain.append(statistics.fmean(t_plain) / statistics.median(t_sgd))
        ms_sgd.append(1e3 * sgd_mean)
        ms_ngd.append(1e3 * statistics.fmean(t for t, _ in t_ngd))
        ms_refresh.append(1e3 * statistics.fmean(t_refresh))
        ms_plain.append(1e3 * statistics.fmean(t_plain))

    def row(name: str, vals: list[float]) -> str:
        return f"{name:<34} {min(vals):6.3f} {statistics.median(vals):6.3f} {max(vals):6.3f}"

    def ms_row(name: str, vals: list[float]) -> str:
        return f"{name:<34} {min(vals):9.2f} {statistics.median(vals):9.2f} {max(vals):9.2f}"

    header = (f"model={args.model} batch={args.batch} threads={args.threads} window={window} steps "
              f"factor_update_steps={cfg.factor_update_steps} inv_update_steps={cfg.inv_update_steps} "
              f"factor_sample_fraction={cfg.factor_sample_fraction} inverse_method={cfg.inverse_method}")
    if device.type == "cuda":
        header += f" device=cuda ({torch.cuda.get_device_name(device)})"
    if args.amp != "none" or args.image_size is not None:
        header += f" amp={args.amp} input={channels}x{side}x{side}"
    print(header)
    print(f"{'SP-NGD / SGD step time':<34} {'min':>6} {'median':>6} {'max':>6}")
    print(row("amortized (all steps)", amortized))
    print(row("factor-refresh steps", refresh))
    print(row("other steps", plain))
    print(f"{'ms per step (window means)':<34} {'min':>9} {'median':>9} {'max':>9}")
    print(ms_row("SGD", ms_sgd))
    print(ms_row("SP-NGD amortized (all steps)", ms_ngd))
    print(ms_row("SP-NGD factor-refresh steps", ms_refresh))
    print(ms_row("SP-NGD other steps", ms_plain))


if __name__ == "__main__":
    main()
