"""Real-text race: SP-NGD vs tuned baselines (AdamW, Muon, LAMB, ...) on the complete Shakespeare, same model, data
order and step budget, each baseline at the best learning rate of a small grid.

Usage (from the repository root, inside the virtualenv)::

    python benchmarks/lm_race.py [--configs adamw_gpt spngd_gpt] [--sweep CONFIG:lr=A,B[:warmup=W1,W2] ...]
        [--model gpt] [--steps 400] [--eval-interval 20] [--global-batch B] [--max-micro-batch 64]
        [--noise-scale] [--ranks 2] [--seed 0] [--out runs/lm_race] [--timeout 1800] [TRAIN_LM ARGS ...]

e.g. ``--configs adamw_gpt muon_gpt lamb_gpt spngd_gpt --sweep adamw_gpt:lr=3e-3,1e-2,2e-2
muon_gpt:lr=0.01,0.02,0.04``. ``--sweep`` specs are ``CONFIG:KEY=V1,V2[:KEY=...]`` with KEY ``lr`` (train_lm.py
``--lr``; for Muon its ``muon_lr``), ``adam_lr`` (Muon's AdamW half) or ``warmup`` (``--warmup-steps``); a config of
a spec that is not in ``--configs`` is appended to them. A config without a spec runs once with its JSON's values.

Every run is ``deepspeed --num_gpus R train_lm.py --deepspeed_config <out>/<run>/ds_config.json ...`` in turn (never
two at once: they would compete for the cores), on its own free master port, with the same ``--seed`` (same initial
weights, same batches) and step budget; unknown arguments go to every train_lm.py run unchanged (e.g. ``--tokenizer
char --n-layer 2 --context 128``), except the flags the race sets per run (``--lr``, ``--warmup-steps``, ...), which
are refused. The run's JSON is ``ds_configs/<config>.json`` with the batch layout of
``--global-batch`` (default: the JSON's ``train_batch_size``; a micro-batch of at most ``--max-micro-batch`` sequences
per rank, gradient accumulation above that) and, with ``--noise-scale``, ZeRO stage 0 and the gradient noise scale
B_simple measured (in ``result.json``). Runs of a ``"type": "Muon"`` config get ``TORCHDYNAMO_DISABLE=1`` when CUDA
is not available (torch.compile makes DeepSpeed's Muon crawl on CPU). DeepSpeed's shared-memory buffers of each
port are deleted after the run; a run that exceeds ``--timeout`` seconds is killed with its whole process group, a
failed or diverged run is recorded and the race goes on.

Resumable: a run whose ``result.json`` exists in ``<out>/<run>/`` with the same command (``command.json``) is reused,
not rerun, so a race stopped by a timeout continues where it stopped when the same command is run again
(:mod:`ds_spngd_lab.sweep.lm_runs`).

Printed (markdown) and written to ``<out>/race.md`` and ``<out>/race.json`` (:mod:`ds_spngd_lab.sweep.lm_report`):
the best LR of each config (lowest final validation loss); the target, the best *baseline's* final validation loss
(baselines: the best LR of every non-SP-NGD config); for every run the steps and training wall time to the target and
their ratios to the best baseline's, median and mean step time with ratios, peak RSS per rank; validation curves of
the best runs. ``<out>/results.json`` holds every run's record and result.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ds_spngd_lab.sweep.lm_report import markdown, summarize
from ds_spngd_lab.sweep.lm_runs import (
    LaunchSettings,
    LMRun,
    add_launch_arguments,
    grid_points,
    load_ds_config,
    resolve_configs,
    run_all,
)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The race's arguments and the train_lm.py arguments it does not know."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)  # --lr must reach train_lm.py's check, not --lr-mults
    ap.add_argument("--configs", nargs="+", default=["adamw_gpt", "spngd_gpt"], help="ds_configs/<name>.json")
    ap.add_argument("--sweep", nargs="*", default=[], metavar="SPEC", help="CONFIG:KEY=V1,V2[:KEY=...] grids")
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps per run (each one's LR schedule)")
    ap.add_argument("--eval-interval", type=int, default=20)
    ap.add_argument("--global-batch", type=int, default=None, help="sequences per step (default: the JSON's)")
    ap.add_argument("--noise-scale", action="store_true", help="ZeRO stage 0 and B_simple measured in every run")
    add_launch_arguments(ap, out="runs/lm_race")
    args, extra = ap.parse_known_args(argv)
    resolve_configs(ap, args, extra, who="the race")
    if any(s.batch is not None for s in args.specs):
        ap.error("CONFIG@B specs belong to benchmarks/lm_batch_scaling.py; use --global-batch here")
    return args, extra


def race_runs(args: argparse.Namespace) -> list[LMRun]:
    """Every run of the race, config by config, each config's grid in order."""
    runs = []
    for config in args.configs:
        batch = args.global_batch or int(load_ds_config(config)["train_batch_size"])
        own = [s for s in args.specs if s.config == config]
        points = list(dict.fromkeys(p for s in own for p in grid_points(s.axes))) if own else [()]
        runs += [LMRun(config, batch, args.steps, args.eval_interval, p) for p in points]
    return runs


def main(argv: list[str] | None = None) -> None:
    """Run (or reuse) every run, then print and write the race."""
    args, extra = parse_args(argv)
    out = Path(args.out)
    settings = LaunchSettings(out=out, model=args.model, ranks=args.ranks, seed=args.seed, timeout_s=args.timeout,
                              max_micro_batch=args.max_micro_batch, noise_scale=args.noise_scale,
                              extra=tuple(extra))  # fmt: skip
    runs = race_runs(args)
    print(f"race: {len(runs)} runs, out {out}", file=sys.stderr, flush=True)
    records = run_all(runs, settings, print_fn=lambda line: print(line, file=sys.stderr, flush=True))
    summary = summarize(records)
    summary["command"] = sys.argv if argv is None else ["benchmarks/lm_race.py", *argv]
    (out / "race.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = markdown(summary)
    (out / "race.md").write_text(text + "\n")
    print(text)
    print(f"\n(JSON: {out / 'race.json'})")


if __name__ == "__main__":
    main()
