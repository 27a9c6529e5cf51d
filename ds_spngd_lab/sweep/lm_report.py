"""The race table of a language-model race with LR sweeps (``benchmarks/lm_race.py``), from the run records of
:mod:`ds_spngd_lab.sweep.lm_runs`.

* **Best of each config.** Each config (one optimizer) may run several learning rates / warm-ups on the same seed,
  data and step budget; its entry is the finished run with the lowest final validation loss (ties: the earlier run).
* **Target.** Baselines are every config whose optimizer is not SP-NGD; the *reference* is the baseline entry with
  the lowest final validation loss (the best baseline), and the target is that loss. Without any baseline the first
  config's entry is the reference.
* **Per run**: steps and training wall time (evaluation excluded) to the first evaluation at or below the target,
  their ratios to the reference's own (its first evaluation at or below its final loss), the median step (a plain
  step) and the mean step (training time / steps: refresh steps amortized), each with its ratio to the reference's,
  and the peak resident memory per rank.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["SPNGD_TYPES", "best_per_config", "first_reach", "fmt", "is_baseline", "markdown", "ratio", "summarize"]

SPNGD_TYPES = frozenset({"spngd"})
SETTING_KEYS = ("model", "tokenizer", "vocab", "context", "n_layer", "n_head", "n_embd", "parameters", "global_batch",
                "micro_batch", "gradient_accumulation_steps", "world_size", "dtype", "zero_stage", "eval_windows",
                "seed")  # fmt: skip


def first_reach(evals: Sequence[Sequence[float]], target: float) -> tuple[int, float] | None:
    """``(step, training time s)`` of the first evaluation with validation loss <= ``target``, or None."""
    return next(((int(s), float(t)) for s, t, v in evals if v is not None and v <= target), None)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing or b is 0."""
    return None if a is None or b is None or b == 0 else a / b


def fmt(v: Any, spec: str = ".3f") -> str:
    """``format(v, spec)``, or an em dash for None / NaN."""
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _finished(r: dict[str, Any]) -> bool:
    res = r.get("result") or {}
    loss = res.get("val_loss")
    return r.get("status") == "ok" and isinstance(loss, (int, float)) and math.isfinite(loss)


def best_per_config(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per config (``record["optimizer"]``), in order of first appearance, its finished run with the lowest final
    validation loss (ties: the earlier run); configs without a finished run are absent."""
    best: dict[str, dict[str, Any]] = {}
    for r in records:
        if _finished(r) and (r["optimizer"] not in best or r["result"]["val_loss"] < best[r["optimizer"]]["result"][
                "val_loss"]):
            best[r["optimizer"]] = r
    order = list(dict.fromkeys(r["optimizer"] for r in records))
    return {c: best[c] for c in order if c in best}


def is_baseline(record: dict[str, Any]) -> bool:
    """True for every optimizer but SP-NGD."""
    return str(record.get("optimizer_type", "")).lower() not in SPNGD_TYPES


def _reference(best: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    baselines = [r for r in best.values() if is_baseline(r)]
    if baselines:
        return min(baselines, key=lambda r: r["result"]["val_loss"])
    return next(iter(best.values()), None)


def _row(r: dict[str, Any], target: float | None, ref: dict[str, Any] | None,
         ref_reach: tuple[int, float] | None) -> dict[str, Any]:
    res = r.get("result") if _finished(r) else None
    row = {k: r.get(k) for k in ("run_id", "optimizer", "optimizer_label", "optimizer_type", "batch", "lr",
                                 "adam_lr", "warmup", "status")}  # fmt: skip
    if res is None:
        return row
    reach = first_reach(res["evals"], target) if target is not None else None
    ref_res = ref["result"] if ref else {}
    mean = res["wall_time_s"] / max(1, res["steps"])
    ref_mean = ref_res["wall_time_s"] / max(1, ref_res["steps"]) if ref else None
    row.update(val_loss=res["val_loss"], steps=res["steps"], wall_time_s=res["wall_time_s"],
               steps_to_target=reach[0] if reach else None, time_to_target_s=reach[1] if reach else None,
               steps_ratio=ratio(reach[0] if reach else None, ref_reach[0] if ref_reach else None),
               time_ratio=ratio(reach[1] if reach else None, ref_reach[1] if ref_reach else None),
               median_step_s=res["median_step_s"], step_time_ratio=ratio(res["median_step_s"],
                                                                         ref_res.get("median_step_s")),
               mean_step_s=mean, mean_step_time_ratio=ratio(mean, ref_mean), peak_rss_mib=res["peak_rss_mib"],
               noise_scale_B_simple=res.get("noise_scale_B_simple"), evals=res["evals"])  # fmt: skip
    return row


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The race: ``target_val_loss`` (None when no run finished), ``reference`` (run id of the best baseline),
    ``baselines`` (configs), ``best`` (config -> run id of its entry), ``setting`` (model and data of the reference)
    and ``runs`` (run id -> row with the numbers of the module docstring; only the identity and status of runs that
    did not finish)."""
    best = best_per_config(records)
    ref = _reference(best)
    target = float(ref["result"]["val_loss"]) if ref else None
    ref_reach = first_reach(ref["result"]["evals"], target) if ref and target is not None else None
    rows = {r["run_id"]: {**_row(r, target, ref, ref_reach), "best": best.get(r["optimizer"]) is r,
                          "reference": r is ref} for r in records}  # fmt: skip
    setting = {k: ref["result"].get(k) for k in SETTING_KEYS} if ref else {}
    return {"target_val_loss": target, "reference": ref["run_id"] if ref else None,
            "baselines": [c for c, r in best.items() if is_baseline(r)],
            "best": {c: r["run_id"] for c, r in best.items()}, "setting": setting, "runs": rows}  # fmt: skip


def _lr_text(row: dict[str, Any]) -> str:
    lr = fmt(row.get("lr"), "g")
    return f"{lr} / {fmt(row['adam_lr'], 'g')}" if row.get("adam_lr") is not None else lr


HEADER = ["run", "optimizer", "lr (Muon: muon / adam)", "warmup", "status", "final val loss", "steps to target",
          "time to target (s)", "steps ratio", "time ratio", "median step (s)", "step-time ratio", "mean step (s)",
          "mean step ratio", "peak RSS per rank (MiB)"]  # fmt: skip


def _cells(row: dict[str, Any]) -> list[str]:
    name = f"**{row['run_id']}**" if row.get("best") else row["run_id"]
    head = [name, row.get("optimizer_label") or row["optimizer"], _lr_text(row), fmt(row.get("warmup"), "g"),
            row["status"]]  # fmt: skip
    if "val_loss" not in row:
        return head + ["—"] * (len(HEADER) - len(head))
    rss = " / ".join(f"{m:.0f}" for m in row["peak_rss_mib"])
    return head + [f"{row['val_loss']:.4f}", fmt(row["steps_to_target"], "d"), fmt(row["time_to_target_s"], ".1f"),
                   fmt(row["steps_ratio"]), fmt(row["time_ratio"]), f"{row['median_step_s']:.3f}",
                   fmt(row["step_time_ratio"]), f"{row['mean_step_s']:.3f}", fmt(row["mean_step_time_ratio"]), rss]


def _table(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return lines + ["| " + " | ".join(_cells(r)) + " |" for r in rows]


def markdown(summary: dict[str, Any]) -> str:
    """The race as markdown: setting, target, the best run of each config, every run (best LR in bold), and the
    validation curves of the best runs (vs steps and training time)."""
    runs = summary["runs"]
    lines = [f"setting: {json.dumps(summary['setting'])}", ""]
    if summary["target_val_loss"] is None:
        return "\n".join(lines + ["no run finished", "", *_table(list(runs.values()))])
    ref = runs[summary["reference"]]
    lines += [f"target: the best baseline's final validation loss {summary['target_val_loss']:.4f} "
              f"({ref['run_id']}; baselines = the best LR of every non-SP-NGD config: "
              f"{', '.join(summary['baselines']) or 'none, so the first config'}); ratios are to {ref['run_id']}", "",
              "Best LR of each config:", "", *_table([runs[i] for i in summary["best"].values()]), "",
              "All runs (bold: the best LR of its config):", "", *_table(list(runs.values())), ""]  # fmt: skip
    names = list(summary["best"].values())
    lines += ["validation loss vs steps (and training wall time, s), best run of each config:", "",
              "| step | " + " | ".join(f"{n} val | {n} time" for n in names) + " |",
              "|---" * (1 + 2 * len(names)) + "|"]  # fmt: skip
    by_step = {n: {int(s): (t, v) for s, t, v in runs[n]["evals"]} for n in names}
    for step in sorted(set().union(*(by_step[n] for n in names))):
        cells = []
        for n in names:
            t, v = by_step[n].get(step, (None, None))
            cells += [fmt(v, ".4f"), fmt(t, ".1f")]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
