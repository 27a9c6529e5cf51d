"""Large-batch regime of the language-model race: batches × configs × LR grid, steps and wall time to a FIXED
validation loss, the gradient noise scale at each batch.

Usage (from the repository root, inside the virtualenv)::

    python benchmarks/lm_batch_scaling.py --target-loss L --steps-per-batch 32:400,128:200,512:120
        [--configs adamw_gpt muon_gpt lamb_gpt spngd_gpt] [--sweep CONFIG[@B]:KEY=V1,V2[:KEY=...] ...]
        [--lr-mults 0.5 1 2] [--evals 20] [--max-micro-batch 64] [--no-noise-scale] [--model gpt] [--ranks 2]
        [--seed 0] [--out runs/lm_batch_scaling] [--timeout 1800] [--report-only] [TRAIN_LM ARGS ...]

Batches and their step budgets come from ``--steps-per-batch``; each run evaluates every ``steps // --evals`` steps.
LR grids (:mod:`ds_spngd_lab.sweep.lm_scaling`): at the smallest batch B₀ a config runs its ``--sweep`` specs without
``@B`` (or its JSON's values); at a larger B its ``CONFIG@B`` specs, or by default the square-root rule's suggestions
``lr₀·√(B/B₀)·m`` for each ``--lr-mults`` m around its best B₀ LR (lowest final validation loss; Muon's ``adam_lr``
scaled alike), with the warm-up at the same fraction of the run as at B₀. So all B₀ runs go first.

Every run is a race run (:mod:`ds_spngd_lab.sweep.lm_runs`: same seed and data order, one launch at a time, the
batch layout with gradient accumulation above ``--max-micro-batch`` sequences per rank, ``TORCHDYNAMO_DISABLE=1`` for
Muon without CUDA, resumable: a run whose ``result.json`` exists with the same command is reused). By default every
run's JSON is switched to ZeRO stage 0 with the ``gradient_noise_scale`` section, so that each run measures B_simple
(McCandlish et al. 2018; it needs every rank's whole local gradient, which ZeRO ≥ 1 never forms; stage 0 changes the
memory layout, not the update); ``--no-noise-scale`` keeps the JSONs' stages. Unknown arguments go to every
train_lm.py run (e.g. ``--tokenizer char``), except the flags the driver sets per run (``--lr``, ...), refused.

Written to ``--out``: ``batch_scaling.md`` (per batch and optimizer: the best LR's steps and training time to
``--target-loss`` with ratios to the best baseline at that batch and B_simple at the target; B_simple per batch; every
run), ``batch_scaling.json`` and ``batch_scaling.png`` (steps to target vs batch, log-log, one line per optimizer with
its ideal linear-scaling line; time to target vs batch); ``results.json`` holds every run's record.
``--report-only`` redoes the report from ``results.json`` (e.g. at another ``--target-loss``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ds_spngd_lab.sweep.lm_report import best_per_config
from ds_spngd_lab.sweep.lm_runs import LaunchSettings, add_launch_arguments, resolve_configs, run_all
from ds_spngd_lab.sweep.lm_scaling import (
    parse_steps_per_batch,
    plan_batch,
    scaling_figure,
    scaling_markdown,
    scaling_summary,
)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The driver's arguments and the train_lm.py arguments it does not know."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)  # --lr must reach train_lm.py's check, not --lr-mults
    ap.add_argument("--target-loss", type=float, required=True, help="fixed validation-loss target")
    ap.add_argument("--steps-per-batch", required=True, help="BATCH:STEPS,... e.g. 32:400,128:200,512:120")
    ap.add_argument("--configs", nargs="+", default=["adamw_gpt", "muon_gpt", "lamb_gpt", "spngd_gpt"])
    ap.add_argument("--sweep", nargs="*", default=[], metavar="SPEC", help="CONFIG[@B]:KEY=V1,V2[:KEY=...] grids")
    ap.add_argument("--lr-mults", nargs="+", type=float, default=[0.5, 1.0, 2.0],
                    help="multipliers of the sqrt-rule LR at batches without a CONFIG@B spec")
    ap.add_argument("--evals", type=int, default=20, help="evaluations per run (every steps // evals steps)")
    ap.add_argument("--no-noise-scale", action="store_true", help="keep the JSONs' ZeRO stages (no B_simple)")
    ap.add_argument("--report-only", action="store_true", help="only redo the report from <out>/results.json")
    add_launch_arguments(ap, out="runs/lm_batch_scaling")
    args, extra = ap.parse_known_args(argv)
    resolve_configs(ap, args, extra, who="the driver")
    try:
        args.steps = parse_steps_per_batch(args.steps_per_batch)
    except ValueError as exc:
        ap.error(str(exc))
    unknown_b = sorted({s.batch for s in args.specs if s.batch is not None} - set(args.steps))
    if unknown_b:
        ap.error(f"--sweep names batches {unknown_b} that --steps-per-batch does not run")
    if args.evals <= 0 or any(m <= 0 for m in args.lr_mults):
        ap.error("--evals and --lr-mults must be positive")
    return args, extra


def run_grid(args: argparse.Namespace, extra: list[str]) -> list[dict]:
    """Run (or reuse) the smallest batch's runs, then every larger batch's (their default LRs come from the first)."""
    settings = LaunchSettings(out=Path(args.out), model=args.model, ranks=args.ranks, seed=args.seed,
                              timeout_s=args.timeout, max_micro_batch=args.max_micro_batch,
                              noise_scale=not args.no_noise_scale, target_loss=args.target_loss,
                              extra=tuple(extra))  # fmt: skip
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    b0 = min(args.steps)
    records: list[dict] = []
    base_runs = plan_batch(args.configs, args.specs, b0, args.steps, args.evals, {}, args.lr_mults)
    log(f"batch {b0}: {len(base_runs)} runs, out {args.out}")
    run_all(base_runs, settings, records, print_fn=log)
    b0_best = best_per_config(records)
    for batch in [b for b in args.steps if b != b0]:
        runs = plan_batch(args.configs, args.specs, batch, args.steps, args.evals, b0_best, args.lr_mults)
        log(f"batch {batch}: {len(runs)} runs")
        run_all(runs, settings, records, print_fn=log)
    return records


def main(argv: list[str] | None = None) -> None:
    """Run the grid (unless ``--report-only``), then write and print the report."""
    args, extra = parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        records = json.loads((out / "results.json").read_text(encoding="utf-8"))
    else:
        records = run_grid(args, extra)
    summary = scaling_summary(records, args.target_loss)
    figure = scaling_figure(summary, out / "batch_scaling.png")
    text = scaling_markdown(summary)
    (out / "batch_scaling.md").write_text(text, encoding="utf-8")
    payload = {k: v for k, v in summary.items() if k != "records"}
    payload["command"] = sys.argv if argv is None else ["benchmarks/lm_batch_scaling.py", *argv]
    (out / "batch_scaling.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(text)
    print(f"(JSON: {out / 'batch_scaling.json'}; figure: {figure})")


if __name__ == "__main__":
    main()
