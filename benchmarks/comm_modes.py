"""Bytes per step on the wire and step time of SP-NGD's three ``precondition_mode`` placements and of momentum SGD,
side by side in one run (ZeRO 0, DeepSpeed engines, gloo CPU ranks, one thread each), next to the step time the
cost model predicts for them (:mod:`ds_spngd.time_model`).

Usage::

    python benchmarks/comm_modes.py [--model cnn4] [--micro-batch 128] [--ranks 2] [--windows 5] [--bf16]
    python benchmarks/comm_modes.py --model resnet18 --image-size 224 [--micro-batch 8] [--windows 3]
        [--warmup-steps 2] [--project-world 64] [--async-inverse]

Input: MNIST-shaped (1×28×28, 10 classes) unless ``--image-size S`` is given, which gives ``resnet18`` /
``resnet50`` ImageNet-shaped synthetic input (3×S×S, 1000 classes; defaults then micro-batch 8, 3 windows, 2
warm-up steps per engine).

Every rank builds four engines on the same model and data — DeepSpeed's SGD (``ds_configs/sgd.json``'s params),
SP-NGD ``comm_opt``, ``mem_opt`` and ``reduce_scatter`` (``ds_configs/spngd.json``'s params otherwise; with
``--async-inverse`` also ``comm_opt+async`` and ``mem_opt+async``: ``async_inverse`` on, measured only) — and times
windows of whole refresh/inversion periods (lcm of factor_update_steps and inv_update_steps steps, so a window holds
its share of refreshes and inversions), alternating the engines window by window to cancel machine drift. Every
``torch.distributed`` collective of the timed windows is logged (:mod:`ds_spngd.comm.wire`: SP-NGD's and
DeepSpeed's own), giving per step the payload handed to collectives and the bytes a rank sends under the ring model.
The first table: median ms/step over windows (the slowest rank) and its ratio to SGD, payload and ring-model bytes
per step and their ratios to SGD's, and the factor payload per step (``factor_bytes``, amortized).

Time model (second and third tables): before each round of windows every rank calibrates this machine's rates
concurrently — an fp32 GEMM's GFLOP/s, the config's inversion's GFLOP/s (Cholesky ``InverseJob`` or ``eigh``), each
at the FLOP-weighted median size of the work it stands for, and a gloo all-reduce's ring-model bandwidth — and the
slowest rank's rates (median over rounds), the measured SGD step and the cost model's bytes
and FLOPs (:func:`ds_spngd.cost_model.mode_costs` on the engines' own blocks, gradient and factor element sizes of
this run, the config's intervals) give each mode's predicted ms/step and ×SGD at this world size and at
``--project-world`` ranks (same per-rank micro-batch and rates), with the predicted time term by term.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ds_spngd.comm.wire import record_collectives
from ds_spngd.cost_model import CostSettings, ModeCost, mode_costs
from ds_spngd.time_model import (
    MachineRates,
    calibration_dims,
    compute_time,
    measure_bandwidth,
    measure_gemm_rate,
    measure_inversion_rate,
    positions_per_example,
    predict_step_time,
    statistics_flops,
)
from ds_spngd_lab.models import build_model
from ds_spngd_lab.ranks import worker_or_launch

ENGINES = ("sgd", "comm_opt", "mem_opt", "reduce_scatter")
ASYNC_ENGINES = ("comm_opt+async", "mem_opt+async")  # --async-inverse: the same modes with async_inverse on


def engines(args: argparse.Namespace) -> tuple[str, ...]:
    """The engines of this run: SGD and the three modes, plus their async_inverse twins with ``--async-inverse``."""
    return ENGINES + (ASYNC_ENGINES if args.async_inverse else ())
IMAGENET_MODELS = ("resnet18", "resnet50")
COMM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def input_spec(args: argparse.Namespace) -> tuple[int, int, int]:
    """(channels, side, classes): MNIST-shaped without ``--image-size``, ImageNet-shaped (3×S×S, 1000) with it."""
    return (1, 28, 10) if args.image_size is None else (3, args.image_size, 1000)


def ds_config(args: argparse.Namespace, kind: str, world: int) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_batch_size": args.micro_batch * world, "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1, "gradient_clipping": 0, "zero_optimization": {"stage": 0},
        "steps_per_print": 10**9,
    }
    if kind == "sgd":
        cfg["optimizer"] = {"type": "SGD", "params": json.loads(Path(args.sgd_config).read_text())["optimizer"]
                            ["params"]}
    else:
        params = json.loads(Path(args.config).read_text())["optimizer"]["params"]
        mode, _, extra = kind.partition("+")
        cfg["optimizer"] = {"type": "SPNGD", "params": {**params, "precondition_mode": mode,
                                                         **({"async_inverse": True} if extra == "async" else {})}}
    if args.bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def calibrate(work: dict[str, Any]) -> dict[str, float]:
    """This rank's :class:`MachineRates` as a dict, at the FLOP-weighted sizes of ``work["dims"]`` (every rank calls
    it at once: the bandwidth is a collective)."""
    torch.distributed.barrier()
    gemm_dim, inv_dim = work["dims"]
    gemm = measure_gemm_rate(gemm_dim, repeats=3)
    inversion = measure_inversion_rate(inv_dim, method=work["method"], repeats=2)
    return {"gemm_flops": gemm, "inversion_flops": inversion, "bytes_per_s": measure_bandwidth()}


def predicted_work(args: argparse.Namespace, spngd: Any, world: int) -> dict[str, Any]:
    """The cost model's :class:`ModeCost` of every mode at ``world`` and ``--project-world`` ranks (as dicts) and the
    statistics FLOPs S of one refresh step, from the engine's own blocks and this run's element sizes."""
    channels, side, classes = input_spec(args)
    with torch.device("meta"):
        shadow = build_model(args.model, classes, channels, image_size=side)
        positions = positions_per_example(shadow, torch.empty(1, channels, side, side))
    cfg = spngd.cfg
    factor_dtype = cfg.comm_dtype if cfg.comm_dtype != "auto" else "fp32"  # "auto" is fp32 on gloo
    settings = CostSettings(grad_bytes=2 if args.bf16 else 4, factor_bytes=COMM_BYTES[factor_dtype],
                            factor_update_steps=cfg.factor_update_steps, inv_update_steps=cfg.inv_update_steps,
                            method=cfg.inverse_method)
    numel = sum(p.numel() for g in spngd.param_groups for p in g["params"])
    costs = {w: {m: vars(c) for m, c in mode_costs(spngd.blocks, numel, w, settings).items()}
             for w in sorted({world, args.project_world})}
    return {"costs": costs, "statistics_flops": statistics_flops(spngd.blocks, positions, args.micro_batch,
                                                                 cfg.factor_sample_fraction),
            "method": cfg.inverse_method, "sample_fraction": cfg.factor_sample_fraction,
            "dims": calibration_dims(spngd.blocks, cfg.inverse_method)}


def build_runs(args: argparse.Namespace, world: int) -> tuple[list[dict[str, Any]], int]:
    """The four engines (SGD first) on the same initial weights, and the window length in steps."""
    import ds_spngd

    channels, side, classes = input_spec(args)
    runs: list[dict[str, Any]] = []
    period = 1
    for kind in engines(args):
        torch.manual_seed(0)
        model = build_model(args.model, classes, channels, image_size=side)
        engine, _, _, _ = ds_spngd.initialize(model=model, model_parameters=model.parameters(),
                                              config=ds_config(args, kind, world))
        spngd = ds_spngd.get_spngd(engine)
        if spngd is not None:
            period = math.lcm(period, spngd.cfg.factor_update_steps, spngd.cfg.inv_update_steps)
        runs.append({"kind": kind, "engine": engine, "spngd": spngd, "times": [], "payload": [], "wire": [],
                     "factor": []})
    return runs, period


def worker(args: argparse.Namespace) -> None:
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    runs, period = build_runs(args, world)
    channels, side, classes = input_spec(args)
    gen = torch.Generator().manual_seed(1000 + rank)
    data = [(torch.randn(args.micro_batch, channels, side, side, generator=gen),
             torch.randint(0, classes, (args.micro_batch,), generator=gen)) for _ in range(4)]
    work = predicted_work(args, runs[1]["spngd"], world)
    rates: list[dict[str, float]] = []

    def steps(run: dict[str, Any], count: int) -> float:
        engine, spngd = run["engine"], run["spngd"]
        factor = 0.0
        for i in range(count):
            x, y = data[i % len(data)]
            loss = F.cross_entropy(engine(x.to(dtype)).float(), y)
            engine.backward(loss)
            engine.step()
            if spngd is not None:
                factor += spngd.last_stats.get("factor_bytes", 0.0) if spngd.last_stats.get("refresh") else 0.0
        return factor

    def window(run: dict[str, Any]) -> None:
        with record_collectives() as log:
            t0 = time.perf_counter()
            factor = steps(run, period)
            elapsed = time.perf_counter() - t0
        run["times"].append(elapsed / period)
        run["payload"].append(log.payload_bytes() / period)
        run["wire"].append(log.wire_bytes() / period)
        run["factor"].append(factor / period)

    warmup = period if args.warmup_steps is None else args.warmup_steps
    for run in runs:
        steps(run, warmup)
    for _ in range(args.windows):
        rates.append(calibrate(work))  # once per round of windows: the rates drift with the machine's load
        for run in runs:
            window(run)
    out: dict[str, Any] = {run["kind"]: {k: run[k] for k in ("times", "payload", "wire", "factor")} for run in runs}
    out.update(period=period, warmup=warmup, rates=rates, work=work)
    Path(args.worker, f"rank{rank}.json").write_text(json.dumps(out))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def measured_table(args: argparse.Namespace, ranks: list[dict[str, Any]]) -> dict[str, float]:
    """Print the measured table; returns the slowest rank's median seconds per step of every engine."""
    period = ranks[0]["period"]
    channels, side, _ = input_spec(args)
    print(f"{args.model} ({channels}×{side}×{side}), {args.ranks} CPU ranks (gloo, 1 thread each), micro-batch "
          f"{args.micro_batch}/rank{', bf16' if args.bf16 else ''}, ZeRO 0, {args.config}; windows of {period} "
          f"steps, {args.windows} per engine, interleaved, after {ranks[0]['warmup']} warm-up steps each")
    print("| engine | ms/step (median) | × SGD | payload KiB/step | × SGD | ring-model KiB sent/step | × SGD | "
          "factor payload KiB/step |")
    print("|---|---|---|---|---|---|---|---|")
    base: dict[str, float] = {}
    times: dict[str, float] = {}
    for kind in engines(args):
        t = max(statistics.median(r[kind]["times"]) for r in ranks)
        times[kind] = t
        payload = statistics.median(ranks[0][kind]["payload"])
        wire = statistics.median(ranks[0][kind]["wire"])
        factor = statistics.median(ranks[0][kind]["factor"])
        if kind == "sgd":
            base = {"t": t, "payload": payload, "wire": wire}
        print(f"| {kind} | {1e3 * t:.1f} | {t / base['t']:.2f} | {payload / 1024:.0f} | "
              f"{payload / base['payload']:.2f} | {wire / 1024:.0f} | {wire / base['wire']:.2f} | "
              f"{factor / 1024:.0f} |")
    return times


def prediction_tables(args: argparse.Namespace, ranks: list[dict[str, Any]], times: dict[str, float]) -> None:
    """Print the calibration, measured vs predicted ms/step and ×SGD, and the predicted terms."""
    rates = MachineRates(**{k: min(statistics.median(c[k] for c in r["rates"]) for r in ranks)
                            for k in ("gemm_flops", "inversion_flops", "bytes_per_s")})
    work = ranks[0]["work"]
    costs = {int(w): {m: ModeCost(**c) for m, c in per.items()} for w, per in work["costs"].items()}
    compute_s = compute_time(times["sgd"], costs[args.ranks]["sgd"], rates)
    pred = {w: {m: predict_step_time(c, compute_s, work["statistics_flops"], rates) for m, c in per.items()}
            for w, per in costs.items()}
    far = args.project_world
    gemm_dim, inv_dim = work["dims"]
    print(f"\ntime model (ds_spngd/time_model.py), slowest rank's rates (median of {len(ranks[0]['rates'])} "
          f"calibrations, one before each round of windows): GEMM {gemm_dim}² {rates.gemm_flops / 1e9:.1f} GFLOP/s, "
          f"inversion ({work['method']}, {inv_dim}²) {rates.inversion_flops / 1e9:.1f} GFLOP/s, gloo all-reduce "
          f"{rates.bytes_per_s / 1e9:.2f} GB/s ring-model bytes sent; statistics "
          f"{work['statistics_flops'] / 1e9:.2f} GFLOP per refresh step (factor_sample_fraction "
          f"{work['sample_fraction']}); base = measured SGD step")
    print(f"| engine | measured ms/step | measured × SGD | predicted ms/step ({args.ranks} ranks) | predicted × SGD "
          f"({args.ranks}) | predicted × SGD ({far}) | model ring KiB/step ({args.ranks}) | measured ring KiB/step |")
    print("|---|---|---|---|---|---|---|---|")
    here, there = pred[args.ranks], pred[far]
    for kind in ENGINES:
        wire = statistics.median(ranks[0][kind]["wire"])
        print(f"| {kind} | {1e3 * times[kind]:.1f} | {times[kind] / times['sgd']:.2f} | "
              f"{1e3 * here[kind].total_s:.1f} | {here[kind].total_s / here['sgd'].total_s:.2f} | "
              f"{there[kind].total_s / there['sgd'].total_s:.2f} | "
              f"{costs[args.ranks][kind].amortized_bytes / 1024:.0f} | {wire / 1024:.0f} |")
    print("\npredicted terms, ms/step (amortized; busiest rank):")
    print("| engine | ranks | compute | communication | statistics | preconditioning | inversion | total | × SGD |")
    print("|---|---|---|---|---|---|---|---|---|")
    for w in sorted(pred):
        for kind in ENGINES:
            p = pred[w][kind]
            print(f"| {kind} | {w} | {1e3 * p.compute_s:.1f} | {1e3 * p.comm_s:.1f} | {1e3 * p.statistics_s:.1f} | "
                  f"{1e3 * p.precondition_s:.1f} | {1e3 * p.inversion_s:.1f} | {1e3 * p.total_s:.1f} | "
                  f"{p.total_s / pred[w]['sgd'].total_s:.2f} |")


def report(args: argparse.Namespace, ranks: list[dict[str, Any]]) -> None:
    times = measured_table(args, ranks)
    prediction_tables(args, ranks, times)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="ds_configs/spngd.json", help="source of the SP-NGD optimizer params")
    ap.add_argument("--sgd-config", default="ds_configs/sgd.json", help="source of the SGD optimizer params")
    ap.add_argument("--model", default="cnn4")
    ap.add_argument("--image-size", type=int, default=None,
                    help="ImageNet-shaped input 3×S×S, 1000 classes (resnet18 / resnet50 only); default MNIST-shaped")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="examples per rank and step (default 128; 8 with --image-size)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--windows", type=int, default=None, help="measured windows per engine (default 5; 3 with "
                    "--image-size)")
    ap.add_argument("--warmup-steps", type=int, default=None,
                    help="unmeasured steps per engine first (default one window; 2 with --image-size)")
    ap.add_argument("--project-world", type=int, default=64, help="world size of the time model's projection")
    ap.add_argument("--bf16", action="store_true", help="DeepSpeed bf16 for every engine")
    ap.add_argument("--async-inverse", action="store_true",
                    help="also time comm_opt and mem_opt with async_inverse on (measured table only)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    imagenet = args.image_size is not None
    if imagenet and (args.model.lower() not in IMAGENET_MODELS or args.image_size < 32):
        ap.error(f"--image-size needs one of {IMAGENET_MODELS} and a side >= 32")
    args.micro_batch = args.micro_batch or (8 if imagenet else 128)
    args.windows = args.windows or (3 if imagenet else 5)
    if args.warmup_steps is None and imagenet:
        args.warmup_steps = 2
    if min(args.micro_batch, args.windows, args.ranks, args.project_world) < 1:
        ap.error("--micro-batch, --windows, --ranks and --project-world must be positive")
    return args


def main() -> None:
    worker_or_launch(parse_args(), __file__, worker, report)


if __name__ == "__main__":
    main()
