"""Real-text race: SP-NGD vs AdamW on the complete Shakespeare, same model, data order and step budget.

Usage (from the repository root, inside the virtualenv)::

    python benchmarks/lm_race.py [--configs adamw_gpt spngd_gpt] [--model gpt] [--steps 400] [--eval-interval 20]
        [--ranks 2] [--seed 0] [--out runs/lm_race] [--timeout 1800] [TRAIN_LM ARGS ...]

Each config runs ``deepspeed --num_gpus R train_lm.py --deepspeed_config ds_configs/<config>.json`` in turn (never
two at once: they would compete for the cores), on its own free master port, with the same ``--seed`` (same initial
weights, same batches) and step budget; unknown arguments go to every train_lm.py run unchanged (e.g. ``--n-layer 2
--context 128 --global-batch 64``). After each run DeepSpeed's shared-memory buffers of its port are deleted
(``/dev/shm/deepspeed_allreduce_buffer_*_<port>_*``; DeepSpeed 0.19.8 never unlinks them). A run that exceeds
``--timeout`` seconds is killed with its whole process group.

Printed (markdown) and written to ``<out>/race.json``: validation loss vs steps and vs training wall time for every
config; the steps and time the later configs take to reach the FIRST config's final validation loss (the baseline,
AdamW by default) and their ratios to the baseline's own steps/time to that loss; median step time (a plain step)
and mean step time (training wall time / steps: refresh steps amortized), each with its ratio;
peak resident memory per rank (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from ds_spngd_lab.ranks import free_port, run_launcher

ROOT = Path(__file__).resolve().parents[1]


def run_config(config: str, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """Run train_lm.py with ``ds_configs/<config>.json`` and return its ``result.json``.

    Raises:
        RuntimeError: the run failed or timed out (with the tail of its log).
    """
    out = Path(args.out) / config
    port = free_port()
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    launcher = [deepspeed] if Path(deepspeed).exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    cmd = [*launcher, "--num_gpus", str(args.ranks), "--master_port", str(port), "train_lm.py",
           "--deepspeed_config", f"ds_configs/{config}.json", "--model", args.model, "--max-steps", str(args.steps),
           "--eval-interval", str(args.eval_interval), "--seed", str(args.seed), "--out-dir", str(out), *extra]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "launcher.log"
    status, _, wall = run_launcher(cmd, dict(os.environ), log_path, port, args.timeout, cwd=ROOT)
    if status != "ok":
        tail = log_path.read_text(errors="replace")[-4000:]
        what = "timed out" if status == "timeout" else "failed"
        raise RuntimeError(f"{config} {what} after {wall:.0f} s; log {log_path}:\n{tail}")
    return json.loads((out / "result.json").read_text())


def first_reach(evals: list[list[float]], target: float) -> tuple[int, float] | None:
    """``(step, training time s)`` of the first evaluation with validation loss <= ``target``, or None."""
    return next(((int(s), float(t)) for s, t, v in evals if v <= target), None)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing or b is 0."""
    return None if a is None or b is None or b == 0 else a / b


def fmt(v: Any, spec: str = ".3f") -> str:
    """``format(v, spec)``, or an em dash for None / NaN."""
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Targets, ratios and curves of the race; the first config is the baseline."""
    names = list(results)
    base = results[names[0]]
    target = float(base["val_loss"])
    base_reach = first_reach(base["evals"], target)
    rows = {}
    for name, r in results.items():
        reach = first_reach(r["evals"], target)
        rows[name] = {
            "optimizer": r["optimizer"], "steps": r["steps"], "wall_time_s": r["wall_time_s"],
            "val_loss": r["val_loss"], "median_step_s": r["median_step_s"],
            "steps_to_target": reach[0] if reach else None, "time_to_target_s": reach[1] if reach else None,
            "steps_ratio": ratio(reach[0] if reach else None, base_reach[0] if base_reach else None),
            "time_ratio": ratio(reach[1] if reach else None, base_reach[1] if base_reach else None),
            "step_time_ratio": ratio(r["median_step_s"], base["median_step_s"]),
            "mean_step_s": r["wall_time_s"] / max(1, r["steps"]),
            "mean_step_time_ratio": ratio(r["wall_time_s"] / max(1, r["steps"]),
                                          base["wall_time_s"] / max(1, base["steps"])),
            "peak_rss_mib": r["peak_rss_mib"], "evals": r["evals"],
        }  # fmt: skip
    keys = ("model", "tokenizer", "vocab", "context", "n_layer", "n_head", "n_embd", "parameters", "global_batch",
            "world_size", "dtype", "zero_stage", "eval_windows", "seed")  # fmt: skip
    return {"baseline": names[0], "target_val_loss": target, "setting": {k: base.get(k) for k in keys},
            "configs": rows}  # fmt: skip


def markdown(summary: dict[str, Any]) -> str:
    """The race as markdown: setting, result table, validation curves (vs steps and vs training time)."""
    rows = summary["configs"]
    names = list(rows)
    lines = [f"setting: {json.dumps(summary['setting'])}", "",
             f"target: the baseline's ({summary['baseline']}) final validation loss {summary['target_val_loss']:.4f}",
             "", "| config | optimizer | steps | final val loss | steps to target | time to target (s) | steps ratio "
             "| time ratio | median step (s) | step-time ratio | mean step (s) | mean step ratio "
             "| peak RSS per rank (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        rss = " / ".join(f"{m:.0f}" for m in r["peak_rss_mib"])
        cells = [name, r["optimizer"], str(r["steps"]), f"{r['val_loss']:.4f}", fmt(r["steps_to_target"], "d"),
                 fmt(r["time_to_target_s"], ".1f"), fmt(r["steps_ratio"]), fmt(r["time_ratio"]),
                 f"{r['median_step_s']:.3f}", fmt(r["step_time_ratio"]), f"{r['mean_step_s']:.3f}",
                 fmt(r["mean_step_time_ratio"]), rss]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "validation loss vs steps (and training wall time, s):", "",
              "| step | " + " | ".join(f"{n} val | {n} time" for n in names) + " |",
              "|---" * (1 + 2 * len(names)) + "|"]  # fmt: skip
    by_step = {n: {int(s): (t, v) for s, t, v in rows[n]["evals"]} for n in names}
    for step in sorted(set().union(*(by_step[n] for n in names))):
        cells = []
        for n in names:
            t, v = by_step[n].get(step, (None, None))
            cells += [fmt(v, ".4f"), fmt(t, ".1f")]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["adamw_gpt", "spngd_gpt"], help="first = baseline")
    ap.add_argument("--model", default="gpt", choices=("gpt", "hf-gpt2"))
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps per run (each one's LR schedule)")
    ap.add_argument("--eval-interval", type=int, default=20)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run before it is killed")
    ap.add_argument("--out", default="runs/lm_race")
    args, extra = ap.parse_known_args()
    missing = [c for c in args.configs if not (ROOT / "ds_configs" / f"{c}.json").exists()]
    if missing:
        ap.error(f"no ds_configs/<name>.json for {missing}")
    results = {config: run_config(config, args, extra) for config in args.configs}
    summary = summarize(results)
    summary["command"] = sys.argv
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "race.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(markdown(summary))
    print(f"\n(JSON: {Path(args.out) / 'race.json'})")


if __name__ == "__main__":
    main()
