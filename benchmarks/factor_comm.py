"""Factor-reduction traffic and overlap of SP-NGD's curvature communication, side by side in one run.

Usage (from the repository root, inside the virtualenv):
    python benchmarks/factor_comm.py [--steps 30] [--warmup 3] [--window 5] [--micro-batch 128] [--bucket-cap-mb 0.25]
        [--factor-sample-fraction 0.25] [--ranks 2] [--skip-measured]

(a) Computed, no processes: per factor-refresh step, the bytes of every factor as a dense fp32 d×d matrix (what a
    dense all-reduce would carry) vs the packed upper triangles in fp32 and bf16, for cnn4 (1×28×28) and resnet18
    (3×224×224). The wire-bytes ratio of a reduce to the owner vs an all-reduce is a *model* (tree reduce: every
    non-root rank sends S once, (P−1)·S in all; ring all-reduce: 2(P−1)·S in all), not a measurement.
(b) Measured on ``--ranks`` CPU ranks (gloo, one thread each, spawned as subprocesses of this script): cnn4 on random
    MNIST-shaped data, factor_update_steps=1 (every step refreshes), overlap_comm on/off × comm_dtype fp32/bf16, all
    four engines built in each rank and stepped in alternating windows of ``--window`` steps (machine drift hits them
    alike). Per step: comm_wait_s (the step blocked on factor reductions, mean over ranks), buckets launched early from
    the hooks, the payload ratio factor_bytes / factor_dense_bytes. hidden = 1 − median wait(on) / median wait(off).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ds_spngd import SPNGD
from ds_spngd.comm.factor_reduction import factor_traffic_bytes
from ds_spngd_lab.models import build_model
from ds_spngd_lab.ranks import launch_ranks

SHAPES = {"cnn4": (10, 1, 28), "resnet18": (1000, 3, 224)}  # classes, channels, image side
CONFIGS = [("on", "fp32"), ("off", "fp32"), ("on", "bf16"), ("off", "bf16")]  # overlap_comm, comm_dtype
MIB = float(1 << 20)


def computed_table() -> None:
    print("(a) factor traffic per refresh step, computed from the model shapes (per rank, before the wire)")
    print(f"{'model':<9} {'factors':>7} {'dense fp32 MiB':>14} {'packed fp32 MiB':>15} {'ratio':>6} "
          f"{'packed bf16 MiB':>15} {'ratio':>6} {'wire bf16 reduce / dense all-reduce (modelled)':>47}")
    for name, (classes, channels, _) in SHAPES.items():
        model = build_model(name, classes, channels)
        opt = SPNGD(model.parameters(), model=model, config={})
        factors = [f for b in opt.blocks for f in b.factors]
        p32, dense = factor_traffic_bytes(factors, torch.float32)
        p16, _ = factor_traffic_bytes(factors, torch.bfloat16)
        opt.remove_hooks()
        print(f"{name:<9} {len(factors):>7} {dense / MIB:>14.3f} {p32 / MIB:>15.3f} {p32 / dense:>6.3f} "
              f"{p16 / MIB:>15.3f} {p16 / dense:>6.3f} {0.5 * p16 / dense:>47.3f}")
    print("targets: packed fp32 ≤ 0.55, packed half ≤ 0.28 of dense fp32")
    print("modelled, not measured: a tree reduce of S bytes to the owner sends (P−1)·S in all, a ring all-reduce "
          "2(P−1)·S, so reducing to the owner moves ~0.5× the wire bytes of an all-reduce (last column = bf16 ratio "
          "× 0.5)\n")


# ---- (b) measured, one rank per subprocess ----------------------------------------------------------------------
def ds_config(args: argparse.Namespace, overlap: str, dtype: str, world: int) -> dict[str, Any]:
    return {
        "train_batch_size": args.micro_batch * world,
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0,
        "zero_optimization": {"stage": 0},
        "steps_per_print": 10**9,
        "optimizer": {"type": "SPNGD", "params": {
            "lr": 0.05, "momentum": 0.9, "damping": 0.01, "factor_decay": 0.9, "factor_update_steps": 1,
            "factor_sample_fraction": args.factor_sample_fraction,
            # one inversion (step 0, warm-up) only: an owner's inversion would skew the ranks' arrival times
            "inv_update_steps": 100000, "comm_dtype": dtype, "overlap_comm": overlap == "on",
            "bucket_cap_mb": args.bucket_cap_mb}},
    }


def worker(args: argparse.Namespace) -> None:
    import deepspeed

    import ds_spngd

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    engines = []
    for overlap, dtype in CONFIGS:
        torch.manual_seed(0)
        model = build_model("cnn4", 10, 1)
        engine, _, _, _ = ds_spngd.initialize(model=model, model_parameters=model.parameters(),
                                              config=ds_config(args, overlap, dtype, world))
        engines.append(engine)
    gen = torch.Generator().manual_seed(1000 + rank)
    data = [(torch.randn(args.micro_batch, 1, 28, 28, generator=gen), torch.randint(0, 10, (args.micro_batch,),
                                                                                      generator=gen))
            for _ in range(4)]
    records: dict[str, list[dict[str, float]]] = {f"{o}/{d}": [] for o, d in CONFIGS}

    def run(k: int, n: int, keep: bool) -> None:
        engine = engines[k]
        spngd = ds_spngd.get_spngd(engine)
        assert spngd is not None
        for i in range(n):
            x, y = data[i % len(data)]
            t0 = time.perf_counter()
            loss = F.cross_entropy(engine(x), y)
            t1 = time.perf_counter()
            engine.backward(loss)
            t2 = time.perf_counter()
            engine.step()
            t3 = time.perf_counter()
            if keep:
                records["/".join(CONFIGS[k])].append(
                    {**spngd.last_stats, "forward": t1 - t0, "backward": t2 - t1, "step": t3 - t2, "total": t3 - t0})

    for k in range(len(engines)):
        run(k, args.warmup, keep=False)
    done = 0
    while done < args.steps:
        n = min(args.window, args.steps - done)
        for k in range(len(engines)):
            run(k, n, keep=True)
        done += n
    Path(args.worker, f"rank{rank}.json").write_text(json.dumps(records))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def measured_table(args: argparse.Namespace) -> None:
    print(f"(b) measured: cnn4, {args.ranks} CPU ranks (gloo, 1 thread each), micro-batch {args.micro_batch}/rank, "
          f"bucket_cap_mb {args.bucket_cap_mb}, factor_sample_fraction "
          f"{args.factor_sample_fraction}, every step refreshes; {args.steps} steps per config after "
          f"{args.warmup} warm-up, windows of {args.window}; medians over steps of the mean over ranks\n"
          "(total = forward+backward+step; hooks = factor_s, building factors inside forward/backward)", flush=True)
    with tempfile.TemporaryDirectory(prefix="factor_comm_") as out:
        ranks = launch_ranks(__file__, args.ranks, out)

    def med(key: str, field: str) -> float:
        per_step = zip(*[[r[field] for r in rk[key]] for rk in ranks], strict=True)
        return statistics.median(statistics.fmean(v) for v in per_step)

    print(f"{'overlap':<7} {'dtype':<5} {'wait ms':>8} {'launch ms':>9} {'forward ms':>10} {'backward ms':>11} "
          f"{'step ms':>8} {'total ms':>8} {'hooks ms':>8} {'buckets':>7} {'early':>5} {'payload/dense':>13}")
    waits: dict[str, float] = {}
    for overlap, dtype in CONFIGS:
        key = f"{overlap}/{dtype}"
        waits[key] = med(key, "comm_wait_s")
        ratio = med(key, "factor_bytes") / med(key, "factor_dense_bytes")
        print(f"{overlap:<7} {dtype:<5} {1e3 * waits[key]:>8.2f} {1e3 * med(key, 'comm_launch_s'):>9.2f} "
              f"{1e3 * med(key, 'forward'):>10.1f} {1e3 * med(key, 'backward'):>11.1f} {1e3 * med(key, 'step'):>8.1f} "
              f"{1e3 * med(key, 'total'):>8.1f} {1e3 * med(key, 'factor_s'):>8.1f} {med(key, 'buckets'):>7.0f} "
              f"{med(key, 'buckets_early'):>5.0f} {ratio:>13.3f}")
    for dtype in ("fp32", "bf16"):
        off = waits[f"off/{dtype}"]
        hidden = 1.0 - waits[f"on/{dtype}"] / off if off > 0 else float("nan")
        print(f"{dtype}: factor communication hidden behind forward/backward = 1 − wait(on)/wait(off) = {hidden:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="measured steps per config")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured steps per config (≥ 2: the first refresh "
                    "learns when factors are final, so it launches nothing early)")
    ap.add_argument("--window", type=int, default=5, help="consecutive steps of one config before switching")
    ap.add_argument("--micro-batch", type=int, default=128, help="examples per rank and step")
    ap.add_argument("--bucket-cap-mb", type=float, default=0.25)
    ap.add_argument("--factor-sample-fraction", type=float, default=0.25, help="as in ds_configs/spngd.json")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--skip-measured", action="store_true", help="print the computed table (a) only")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args)
        return
    computed_table()
    if not args.skip_measured:
        measured_table(args)


if __name__ == "__main__":
    main()
