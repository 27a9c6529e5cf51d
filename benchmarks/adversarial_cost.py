"""Per-step cost of adversarial training: none vs plain vs ConAdv (:mod:`ds_spngd_lab.adversarial`), side by side.

Usage::

    python benchmarks/adversarial_cost.py [--model cnn4] [--micro-batch 128] [--ranks 2] [--windows 5]
        [--config ds_configs/spngd.json | ds_configs/sgd.json] [--epsilon 0.1] [--steps 1]

Every rank (gloo, one thread each, ZeRO 0) builds three DeepSpeed engines on the same initial weights and
MNIST-shaped synthetic input (1×28×28, 10 classes): ``none`` (clean training), ``plain`` (perturbation at the
current weights, then the engine pass on clean + adversarial examples) and ``conadv`` (perturbation at the previous
step's weights, started one micro-batch ahead by the loop's look-ahead). Each step runs exactly what
:class:`ds_spngd_lab.loop.TrainingLoop` runs (``AdversarialStep.loss`` → ``engine.backward`` →
``before_update`` → ``engine.step``). Windows of whole refresh/inversion periods of the config (lcm of
factor_update_steps and inv_update_steps; 10 steps for a first-order config) alternate none / plain / conadv to
cancel machine drift, after one unmeasured window each. Printed: the slowest rank's median ms/step over windows and
its min / median / max ratio to ``none`` over the rounds, and the median time of the perturbation pass per step
(inside the step).

On a CPU nothing runs concurrently: ConAdv's perturbation is the same forward+backward of N examples as plain's,
only at other weights, so its step costs what plain's does. The overlap it allows needs a CUDA side stream
(``"overlap": true``), which this benchmark does not exercise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ds_spngd_lab.adversarial import AdversarialStep, AdversarialTask, parse_adversarial
from ds_spngd_lab.models import build_model
from ds_spngd_lab.ranks import worker_or_launch

KINDS = ("none", "plain", "conadv")


def ds_config(args: argparse.Namespace, world: int) -> dict[str, Any]:
    """ZeRO-0 config with ``--config``'s optimizer, ``--micro-batch`` per rank, no scheduler."""
    src = json.loads(Path(args.config).read_text())
    return {"train_batch_size": args.micro_batch * world, "train_micro_batch_size_per_gpu": args.micro_batch,
            "gradient_accumulation_steps": 1, "gradient_clipping": 0, "zero_optimization": {"stage": 0},
            "steps_per_print": 10**9, "optimizer": src["optimizer"]}  # fmt: skip


def build_runs(args: argparse.Namespace, world: int) -> tuple[list[dict[str, Any]], int]:
    """The three engines (same initial weights) with their :class:`AdversarialStep` (None for ``none``), and the
    window length in steps."""
    import ds_spngd

    runs: list[dict[str, Any]] = []
    period = 1
    task = AdversarialTask(prepare=lambda x: x, criterion=lambda z, y: F.cross_entropy(z, y))
    for kind in KINDS:
        torch.manual_seed(0)
        model = build_model(args.model, 10, 1, image_size=28)
        engine, _, _, _ = ds_spngd.initialize(model=model, model_parameters=model.parameters(),
                                              config=ds_config(args, world))  # fmt: skip
        spngd = ds_spngd.get_spngd(engine)
        if spngd is not None:
            period = math.lcm(period, spngd.cfg.factor_update_steps, spngd.cfg.inv_update_steps)
        adv = None
        if kind != "none":
            cfg = parse_adversarial({"adversarial": {"enabled": True, "mode": kind, "epsilon": args.epsilon,
                                                     "steps": args.steps}})  # fmt: skip
            adv = AdversarialStep(cfg, engine, task)
            _time_perturbation(adv)
        runs.append({"kind": kind, "engine": engine, "adv": adv, "times": [], "perturb": []})
    return runs, max(period, 10)


def _time_perturbation(adv: AdversarialStep) -> None:
    """Accumulate the wall time of ``adv.perturbation`` in ``adv.perturb_s`` (an instance attribute)."""
    plain = adv.perturbation
    adv.perturb_s = 0.0  # type: ignore[attr-defined]

    def timed(*a: Any, **kw: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return plain(*a, **kw)
        finally:
            adv.perturb_s += time.perf_counter() - t0  # type: ignore[attr-defined]

    adv.perturbation = timed  # type: ignore[method-assign]


def worker(args: argparse.Namespace) -> None:
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    runs, period = build_runs(args, world)
    gen = torch.Generator().manual_seed(1000 + rank)
    data = [(torch.randn(args.micro_batch, 1, 28, 28, generator=gen),
             torch.randint(0, 10, (args.micro_batch,), generator=gen)) for _ in range(4)]

    def stream(count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(count):
            x, y = data[i % len(data)]
            yield x.clone(), y  # a fresh tensor per micro-batch, as a data loader gives

    def window(run: dict[str, Any], record: bool) -> None:
        engine, adv = run["engine"], run["adv"]
        torch.distributed.barrier()
        before = adv.perturb_s if adv is not None else 0.0
        t0 = time.perf_counter()
        batches = stream(period) if adv is None else adv.lookahead(stream(period), 1)
        for x, y in batches:
            loss = F.cross_entropy(engine(x), y) if adv is None else adv.loss(x, y)
            engine.backward(loss)
            if adv is not None:
                adv.before_update()
            engine.step()
        elapsed = time.perf_counter() - t0
        if record:
            run["times"].append(elapsed / period)
            run["perturb"].append(((adv.perturb_s if adv is not None else 0.0) - before) / period)

    for run in runs:
        window(run, record=False)
    for _ in range(args.windows):
        for run in runs:
            window(run, record=True)
    out = {run["kind"]: {"times": run["times"], "perturb": run["perturb"]} for run in runs}
    Path(args.worker, f"rank{rank}.json").write_text(json.dumps({**out, "period": period}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def report(args: argparse.Namespace, ranks: list[dict[str, Any]]) -> None:
    """Print the table: slowest rank per window, medians over windows, ratios to ``none`` per round."""
    period = ranks[0]["period"]
    windows = {k: [max(r[k]["times"][i] for r in ranks) for i in range(args.windows)] for k in KINDS}
    print(f"{args.model} (1×28×28), {args.ranks} CPU ranks (gloo, 1 thread each), micro-batch {args.micro_batch}/rank, "
          f"ZeRO 0, optimizer of {args.config}; adversarial epsilon {args.epsilon}, {args.steps} step(s); windows of "
          f"{period} steps, {args.windows} per kind, interleaved, after one warm-up window each")
    print("| kind | ms/step (median) | × none (min / median / max over rounds) | perturbation pass ms/step |")
    print("|---|---|---|---|")
    for kind in KINDS:
        ratios = [t / b for t, b in zip(windows[kind], windows["none"], strict=True)]
        perturb = statistics.median(max(r[kind]["perturb"][i] for r in ranks) for i in range(args.windows))
        print(f"| {kind} | {1e3 * statistics.median(windows[kind]):.1f} | {min(ratios):.2f} / "
              f"{statistics.median(ratios):.2f} / {max(ratios):.2f} | {1e3 * perturb:.1f} |")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="ds_configs/spngd.json", help="source of the optimizer section")
    ap.add_argument("--model", default="cnn4")
    ap.add_argument("--micro-batch", type=int, default=128, help="examples per rank and step (clean ones)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--windows", type=int, default=5, help="measured windows per kind")
    ap.add_argument("--epsilon", type=float, default=0.1, help="adversarial.epsilon (normalised-pixel units)")
    ap.add_argument("--steps", type=int, default=1, help="adversarial.steps (1: FGSM)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if min(args.micro_batch, args.ranks, args.windows, args.steps) < 1 or args.epsilon < 0:
        ap.error("--micro-batch, --ranks, --windows, --steps must be positive and --epsilon >= 0")
    return args


def main() -> None:
    worker_or_launch(parse_args(), __file__, worker, report)


if __name__ == "__main__":
    main()
