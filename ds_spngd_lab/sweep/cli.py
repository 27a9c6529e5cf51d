"""Command line of the scaling sweep (``python -m ds_spngd_lab.sweep`` or ``python launch/sweep.py``), from the
repository root::

    python -m ds_spngd_lab.sweep --name fmnist --batches 256 1024 4096 16384 --optimizers sgd lars lamb spngd \\
        --lr-mults 0.5 1 2 --worlds 2 --epochs 10 --model mlp --dataset fashion-mnist --target-acc 0.88

runs the grid (:mod:`ds_spngd_lab.sweep.runner`), then writes ``summary.md`` and the figures into ``--out`` (default
``runs/sweeps/<name>``) and logs them as images to a ``summary`` W&B run of the group. ``--report-only`` redoes the
report from an existing ``results.json``. Arguments after ``--`` go to every ``train.py`` run unchanged.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ds_spngd_lab.sweep.grid import OPTIMIZERS
from ds_spngd_lab.sweep.report import load_records, log_to_wandb, retarget, write_report
from ds_spngd_lab.sweep.runner import WANDB_MODES, SweepSettings, run_sweep, wandb_mode

__all__ = ["main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The sweep's arguments and the ``train.py`` arguments after ``--``."""
    argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="python -m ds_spngd_lab.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--name", default=None, help="sweep name = W&B group (default sweep-<date>-<time>)")
    p.add_argument("--out", default=None, help="output folder (default runs/sweeps/<name>)")
    p.add_argument("--optimizers", nargs="+", default=["sgd", "lars", "lamb", "spngd"], choices=sorted(OPTIMIZERS))
    p.add_argument("--batches", nargs="+", type=int, default=[256, 1024, 4096, 16384], help="global batch sizes")
    p.add_argument("--lr-mults", nargs="+", type=float, default=[0.5, 1.0, 2.0],
                   help="multipliers of each optimizer's scaled LR at each batch (the LR grid)")
    p.add_argument("--worlds", nargs="+", type=int, default=[2], help="data-parallel world sizes (--num_gpus)")
    p.add_argument("--epochs", type=float, default=10.0, help="epoch budget of every run")
    p.add_argument("--model", default="mlp")
    p.add_argument("--dataset", default="fashion-mnist", choices=("fashion-mnist", "mnist"))
    p.add_argument("--target-acc", type=float, default=0.88, help="test top-1 for steps / time to target")
    p.add_argument("--seed", type=int, default=0, help="same model initialisation and data order for every run")
    p.add_argument("--max-steps", type=int, default=None, help="cap every run at this many optimizer steps")
    p.add_argument("--max-micro-batch", type=int, default=2048,
                   help="largest micro-batch per rank; bigger per-rank batches use gradient accumulation")
    p.add_argument("--evals-per-epoch", type=int, default=4, help="test evaluations per epoch (at least one a step)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before a run is killed")
    p.add_argument("--project", default="ds_spngd-scaling", help="W&B project")
    p.add_argument("--wandb-mode", default="auto", choices=WANDB_MODES,
                   help="auto: offline unless logged in (WANDB_API_KEY or netrc) or WANDB_MODE is set")
    p.add_argument("--resume", action="store_true", help="keep runs whose result.json exists")
    p.add_argument("--stream", action="store_true", help="show each run's output (tqdm bar) instead of a log file")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from <out>/results.json")
    p.add_argument("--report-dir", default=None,
                   help="where summary.md and the figures go (default --out); with --report-only and another "
                        "--target-acc than the runs', steps/time to target are recomputed from their evaluations")
    args = p.parse_args(argv)
    if not 0 < args.target_acc <= 1:
        p.error(f"--target-acc must lie in (0, 1], got {args.target_acc}")
    if args.report_only and args.out is None and args.name is None:
        p.error("--report-only needs --out or --name")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    """Run the sweep (or only its report); returns the exit status (1 when every run failed)."""
    args, extra = parse_args(argv)
    out = Path(args.out) if args.out else None
    saved = json.loads((out / "sweep.json").read_text()) if out and (out / "sweep.json").exists() else {}
    name = args.name or saved.get("name") or (out.name if out else time.strftime("sweep-%Y%m%d-%H%M%S"))
    out = out or Path("runs") / "sweeps" / name
    settings = SweepSettings(
        name=name, out_dir=out, optimizers=args.optimizers, batches=args.batches, lr_mults=args.lr_mults,
        worlds=args.worlds, epochs=args.epochs, model=args.model, dataset=args.dataset, target_acc=args.target_acc,
        seed=args.seed, max_steps=args.max_steps, max_micro_batch=args.max_micro_batch,
        evals_per_epoch=args.evals_per_epoch, timeout_s=args.timeout, project=args.project,
        wandb_mode=args.wandb_mode, resume=args.resume, stream=args.stream, extra_args=tuple(extra),
    )  # fmt: skip
    mode = wandb_mode(args.wandb_mode)
    t0 = time.monotonic()
    if not args.report_only:
        run_sweep(settings)
    records = retarget(load_records(out), args.target_acc)
    report_dir = Path(args.report_dir) if args.report_dir else out
    summary, figures = write_report(records, report_dir, args.target_acc)
    config = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").exists() else {}
    config["report_target_acc"] = args.target_acc
    run_name = f"{name}-summary" if report_dir == out else f"{name}-summary-{report_dir.name}"
    folder = log_to_wandb(records, figures, out, args.project, name, mode, config=config, name=run_name)
    print(summary.read_text(encoding="utf-8"))
    print(f"\nreport: {summary}; figures: {', '.join(str(f) for f in figures)}")
    if folder is not None:
        print(f"W&B ({mode}): project {args.project}, group {name}; summary run in {folder}")
        if mode == "offline":
            print(f"upload later with: wandb sync {out}/wandb/offline-run-*")
    if not args.report_only:
        print(f"sweep wall time {time.monotonic() - t0:.0f} s")
    ok = sum(1 for r in records if r.get("status") == "ok")
    return 0 if ok else 1
