"""Steps and wall time to a test accuracy: SP-NGD vs momentum SGD (Goyal) vs LAMB, side by side in one run.

Usage (from the repository root, inside the virtualenv):
    python benchmarks/time_to_accuracy.py [--batches 1024 4096] [--model cnn4] [--epochs 8] [--target 0.985]
        [--configs spngd sgd lamb] [--ranks 2] [--eval-interval 4] [--out runs/tta]

Each (config, batch) pair runs ``deepspeed --num_gpus R train.py`` with the same model, seed and data order, evaluating
every ``--eval-interval`` steps (evaluation is excluded from the timed training), and stops at the target.
``--epochs`` is each optimizer's schedule length (the "auto" decay horizon of its JSON scheduler): part of its tuned
recipe, as in Goyal et al.'s fixed-epoch budgets.
Runs are sequential so that they do not compete for cores. The table gives, per batch size, steps and training
seconds to the target, and both as ratios over the SGD run; per-step time is training seconds / steps.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from ds_spngd_lab.ranks import remove_shm_buffers


def run(config: str, batch: int, args: argparse.Namespace, port: int) -> dict:
    out = Path(args.out) / f"{config}_b{batch}"
    cmd = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks), "--master_port", str(port),
        "train.py", "--deepspeed_config", f"ds_configs/{config}.json", "--model", args.model,
        "--global-batch", str(batch), "--epochs", str(args.epochs[config]), "--target-acc", str(args.target),
        "--eval-interval", str(args.eval_interval), "--stop-at-target", "--out-dir", str(out), "--seed", str(args.seed),
    ]
    if args.bn_recalib_batches:
        cmd += ["--bn-recalib-batches", str(args.bn_recalib_batches)]
    print("$", " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    finally:  # DeepSpeed's CPU comm op leaves 69 MB per rank in /dev/shm for this port
        remove_shm_buffers(port)
    if proc.returncode != 0:
        raise RuntimeError(f"{config} at batch {batch} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads((out / "result.json").read_text())


def fmt(v: float | None, spec: str) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--configs", nargs="+", default=["spngd", "sgd", "lamb"])
    ap.add_argument("--model", default="cnn4")
    ap.add_argument("--epochs", nargs="+", default=["spngd=2", "sgd=5", "lamb=5"],
                    help="schedule length per config, CONFIG=EPOCHS")
    ap.add_argument("--target", type=float, default=0.985)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--eval-interval", type=int, default=4)
    ap.add_argument("--bn-recalib-batches", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/tta")
    args = ap.parse_args()
    try:
        args.epochs = {k: float(v) for k, v in (e.split("=", 1) for e in args.epochs)}
    except ValueError:
        ap.error(f"--epochs takes CONFIG=EPOCHS pairs, got {args.epochs}")
    missing = [c for c in args.configs if c not in args.epochs]
    if missing:
        ap.error(f"--epochs has no entry for {missing}")

    results: dict[tuple[str, int], dict] = {}
    port = 29650
    for batch in args.batches:
        for config in args.configs:
            results[(config, batch)] = run(config, batch, args, port)
            port += 1
    print(f"\nmodel {args.model}, {args.ranks} ranks, target test top-1 {args.target:.2%}, eval every "
          f"{args.eval_interval} steps, schedule epochs {args.epochs}")
    head = f"{'batch':>6} {'config':<7} {'top-1':>7} {'steps→':>7} {'time→ s':>8} {'s/step':>7} " \
           f"{'steps ratio':>11} {'time ratio':>10} {'step-time ratio':>15}"
    print(head)
    for batch in args.batches:
        base = results.get(("sgd", batch))
        for config in args.configs:
            r = results[(config, batch)]
            steps, secs = r.get("steps_to_target"), r.get("time_to_target_s")
            per_step = r["wall_time_s"] / r["steps"]
            ratio_s = ratio_t = None
            if base and steps and base.get("steps_to_target"):
                ratio_s = steps / base["steps_to_target"]
                ratio_t = secs / base["time_to_target_s"]
            ratio_p = per_step / (base["wall_time_s"] / base["steps"]) if base else None
            print(f"{batch:>6} {config:<7} {r['test_top1']:>7.2%} {fmt(steps, 'd'):>7} {fmt(secs, '.1f'):>8} "
                  f"{per_step:>7.3f} {fmt(ratio_s, '.3f'):>11} {fmt(ratio_t, '.3f'):>10} {fmt(ratio_p, '.3f'):>15}")


if __name__ == "__main__":
    main()
