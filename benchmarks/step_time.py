"""Per-step time of SP-NGD over momentum SGD on the same model, batch and data (side by side, interleaved).

Usage:
    python benchmarks/step_time.py [--config ds_configs/spngd.json] [--model cnn4] [--batch 512] [--repeats 5]

Each repeat times one window of SGD steps and one window of SP-NGD steps on the same inputs (the window is a
multiple of the config's factor_update_steps and inv_update_steps, so it holds the amortized share of factor
refreshes and inversions). Windows alternate SGD/SP-NGD to cancel machine drift. Prints, over repeats, the
min/median/max of the amortized ratio, and the ratios of refresh steps and plain steps alone.
One process and one thread: on the MNIST job each of the 2 ranks runs one thread, and the factor reduction's
communication is a separate cost (benchmarks/comm is the place for it).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ds_spngd import SPNGD
from ds_spngd.config import parse_spngd_params
from ds_spngd.models import build_model


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="ds_configs/spngd.json")
    ap.add_argument("--model", default="cnn4")
    ap.add_argument("--batch", type=int, default=512, help="examples per step (one rank's micro-batch)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = parse_spngd_params(json.loads(Path(args.config).read_text())["optimizer"]["params"])
    period = math.lcm(cfg.factor_update_steps, cfg.inv_update_steps)
    window = period * max(1, math.ceil(10 / period))
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))

    sgd_model = build_model(args.model, 10, 1)
    ngd_model = build_model(args.model, 10, 1)
    ngd_model.load_state_dict(sgd_model.state_dict())
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    ngd = SPNGD(ngd_model.parameters(), model=ngd_model, config=cfg)
    for _ in range(2):  # warm-up: allocator, first inversion
        _step(sgd_model, sgd, x, y)
    for _ in range(period):
        _step(ngd_model, ngd, x, y)

    amortized, refresh, plain = [], [], []
    for _ in range(args.repeats):
        t_sgd = [_step(sgd_model, sgd, x, y) for _ in range(window)]
        t_ngd = []
        for _ in range(window):
            was_refresh = ngd.steps % cfg.factor_update_steps == 0
            t_ngd.append((_step(ngd_model, ngd, x, y), was_refresh))
        sgd_mean = statistics.fmean(t_sgd)
        amortized.append(statistics.fmean(t for t, _ in t_ngd) / sgd_mean)
        refresh.append(statistics.fmean([t for t, r in t_ngd if r]) / statistics.median(t_sgd))
        plain.append(statistics.fmean([t for t, r in t_ngd if not r] or [math.nan]) / statistics.median(t_sgd))

    def row(name: str, vals: list[float]) -> str:
        return f"{name:<34} {min(vals):6.3f} {statistics.median(vals):6.3f} {max(vals):6.3f}"

    print(f"model={args.model} batch={args.batch} threads={args.threads} window={window} steps "
          f"factor_update_steps={cfg.factor_update_steps} inv_update_steps={cfg.inv_update_steps} "
          f"factor_sample_fraction={cfg.factor_sample_fraction} inverse_method={cfg.inverse_method}")
    print(f"{'SP-NGD / SGD step time':<34} {'min':>6} {'median':>6} {'max':>6}")
    print(row("amortized (all steps)", amortized))
    print(row("factor-refresh steps", refresh))
    print(row("other steps", plain))


if __name__ == "__main__":
    main()
