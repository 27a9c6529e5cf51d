"""The large-batch regime of the language-model race (``benchmarks/lm_batch_scaling.py``): the run grid over global
batch × config × LR grid, and its report (markdown table, JSON, figure) at a FIXED validation-loss target.

**Grid.** Every batch B has its own step budget (``32:400,128:200,512:120``) and evaluates every ``steps // evals``
steps. At the smallest batch B₀ a config runs its ``--sweep`` grid (specs without ``@B`` apply to B₀ only), or the
JSON's values. At a larger B a config runs its ``CONFIG@B`` specs if given; otherwise the square-root rule's
suggestions around its best B₀ run (lowest final validation loss): ``lr = lr₀ · √(B/B₀) · m`` for each multiplier m
(Muon's ``adam_lr`` scaled alike) with the warm-up kept at the same fraction of the run (``warmup₀ · steps(B) /
steps(B₀)``). B₀'s runs therefore go first.

**Report.** The steps / training time to the target are recomputed from each run's evaluations
(:func:`retarget`), so the report can be redone at another target. Per batch and config the entry is the LR that
reached the target in the fewest steps (ties: less time; :func:`ds_spngd_lab.sweep.report.best_by_steps`, as in the
Fashion-MNIST sweep), else the lowest final loss, marked not reached. Ratios are to the best baseline (every
optimizer but SP-NGD) at the same batch. B_simple (McCandlish et al. 2018) is the entry's value when it first reached
the target, and per batch the median over its runs (:func:`ds_spngd_lab.sweep.report.measured_noise_scale`).
Figure: steps and time to target vs batch (log-log), one line per optimizer with its ideal linear-scaling line
S(B) = S(B₁)·B₁/B from its smallest batch B₁ that reached the target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ds_spngd_lab.sweep import report
from ds_spngd_lab.sweep.lm_report import best_per_config, first_reach, fmt, is_baseline, ratio
from ds_spngd_lab.sweep.lm_runs import LMRun, Point, SweepSpec, grid_points

__all__ = ["parse_steps_per_batch", "plan_batch", "retarget", "scaled_points", "scaling_markdown", "scaling_figure",
           "scaling_summary"]  # fmt: skip

COLORS = {"AdamW": "tab:blue", "Muon": "tab:purple", "LAMB": "tab:green", "SP-NGD": "tab:red"}


def parse_steps_per_batch(text: str) -> dict[int, int]:
    """``"32:400,128:200"`` -> ``{32: 400, 128: 200}`` (sorted by batch).

    Raises:
        ValueError: not ``B:STEPS`` pairs of positive integers, or a batch given twice.
    """
    out: dict[int, int] = {}
    for pair in text.split(","):
        b, _, s = pair.partition(":")
        if not (b.strip().isdigit() and s.strip().isdigit()) or int(b) <= 0 or int(s) <= 0:
            raise ValueError(f"steps per batch {text!r}: {pair!r} is not BATCH:STEPS with positive integers")
        if int(b) in out:
            raise ValueError(f"steps per batch {text!r}: batch {b} given twice")
        out[int(b)] = int(s)
    return dict(sorted(out.items()))


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def scaled_points(base: dict[str, Any], b0: int, batch: int, steps0: int, steps: int,
                  mults: Sequence[float]) -> list[Point]:
    """Grid at ``batch`` around the B₀ run ``base`` (a record with ``lr``, ``adam_lr``, ``warmup``): ``lr₀·√(B/B₀)·m``
    per multiplier (Muon's ``adam_lr`` alike, 4 significant digits), warm-up ``round(warmup₀·steps/steps₀)``."""
    factor = math.sqrt(batch / b0)
    warmup = round(float(base["warmup"]) * steps / steps0) if base.get("warmup") else 0
    points = []
    for m in mults:
        point: list[tuple[str, float]] = [("lr", _sig(float(base["lr"]) * factor * m))]
        if base.get("adam_lr") is not None:
            point.append(("adam_lr", _sig(float(base["adam_lr"]) * factor * m)))
        if warmup > 0:
            point.append(("warmup", float(warmup)))
        points.append(tuple(point))
    return points


def plan_batch(configs: Sequence[str], specs: Sequence[SweepSpec], batch: int, steps_per_batch: dict[int, int],
               evals: int, b0_best: dict[str, dict[str, Any]], mults: Sequence[float]) -> list[LMRun]:
    """The runs at ``batch`` (module docstring): ``CONFIG@batch`` specs, else at B₀ the specs without a batch (or
    the JSON), else :func:`scaled_points` around ``b0_best[config]`` (a config without a finished B₀ run gets the
    JSON's values). Ids are prefixed ``b<batch>/``."""
    b0 = min(steps_per_batch)
    steps = steps_per_batch[batch]
    interval = max(1, steps // evals)
    runs = []
    for config in configs:
        own = [s for s in specs if s.config == config and s.batch == batch]
        if not own and batch == b0:
            own = [s for s in specs if s.config == config and s.batch is None]
        if own:
            points = list(dict.fromkeys(p for s in own for p in grid_points(s.axes)))
        elif batch != b0 and config in b0_best:
            points = scaled_points(b0_best[config], b0, batch, steps_per_batch[b0], steps, mults)
        else:
            points = [()]
        runs += [LMRun(config, batch, steps, interval, p, prefix=f"b{batch}/") for p in points]
    return runs


def retarget(records: Sequence[dict[str, Any]], target: float) -> list[dict[str, Any]]:
    """Copies of the finished records with ``steps_to_target`` / ``time_to_target_s`` recomputed for validation
    loss ``target`` from their evaluations; ``noise_scale_B_simple_at_target`` is kept only where the run measured
    it at this same target. Other records are returned unchanged."""
    out = []
    for r in records:
        res = r.get("result")
        if not res:
            out.append(r)
            continue
        hit = first_reach(res.get("evals", []), target)
        same = res.get("target_loss") is not None and math.isclose(res["target_loss"], target, rel_tol=1e-9)
        new = {**res, "target_loss": target, "steps_to_target": hit[0] if hit else None,
               "time_to_target_s": hit[1] if hit else None,
               "noise_scale_B_simple_at_target": res.get("noise_scale_B_simple_at_target") if same else None}
        out.append({**r, "result": new})
    return out


def _entry(batch: int, config: str, best: dict[str, Any], reached: bool, n: int) -> dict[str, Any]:
    res = best["result"]
    return {"batch": batch, "config": config, "label": best["optimizer_label"], "baseline": is_baseline(best),
            "run_id": best["run_id"], "runs": n, "lr": best["lr"], "adam_lr": best.get("adam_lr"),
            "warmup": best.get("warmup"), "micro": best["micro"], "gas": best["gas"], "steps": res["steps"],
            "val_loss": res["val_loss"], "reached": reached,
            "steps_to_target": res["steps_to_target"] if reached else None,
            "time_to_target_s": res["time_to_target_s"] if reached else None,
            "noise_at_target": res.get("noise_scale_B_simple_at_target") if reached else None}  # fmt: skip


def scaling_summary(records: Sequence[dict[str, Any]], target: float) -> dict[str, Any]:
    """Per batch and config the entry (module docstring) with ratios to the best baseline at that batch, the median
    B_simple per batch and the retargeted records: ``{"target_loss", "rows", "noise_by_batch", "records"}``."""
    recs = retarget(records, target)
    by_steps = report.best_by_steps(recs)
    configs = list(dict.fromkeys(r["optimizer"] for r in recs))
    rows, noise = [], {}
    for b in sorted({int(r["batch"]) for r in recs}):
        at_b = [r for r in recs if int(r["batch"]) == b]
        by_loss = best_per_config(at_b)
        noise[b] = report.measured_noise_scale(at_b)
        batch_rows = []
        for c in configs:
            n = sum(1 for r in at_b if r["optimizer"] == c)
            fast = next((v[b] for (o, _), v in by_steps.items() if o == c and b in v), None)
            best = fast or by_loss.get(c)
            if best is not None:
                batch_rows.append(_entry(b, c, best, fast is not None, n))
            elif n:
                batch_rows.append({"batch": b, "config": c, "label": c, "runs": n, "reached": False,
                                   "status": "/".join(sorted({r["status"] for r in at_b if r["optimizer"] == c}))})
        base = [r for r in batch_rows if r.get("baseline") and r["reached"]]
        ref = min(base, key=lambda r: (r["steps_to_target"], r["time_to_target_s"])) if base else None
        for r in batch_rows:
            r["steps_ratio"] = ratio(r.get("steps_to_target"), ref["steps_to_target"] if ref else None)
            r["time_ratio"] = ratio(r.get("time_to_target_s"), ref["time_to_target_s"] if ref else None)
        rows += batch_rows
    return {"target_loss": target, "rows": rows, "noise_by_batch": noise, "records": recs}


HEADER = ["batch", "optimizer", "micro×gas", "LRs tried", "best lr (Muon: muon / adam)", "warmup", "steps run",
          "final val loss", "steps to target", "time to target (s)", "steps ratio", "time ratio",
          "B_simple at target"]  # fmt: skip
GRID_HEADER = ["run", "status", "lr", "warmup", "final val loss", "steps to target", "time to target (s)",
               "B_simple at target", "B_simple final", "launch wall (s)"]  # fmt: skip


def _lr(r: dict[str, Any]) -> str:
    lr = fmt(r.get("lr"), ".4g")
    return f"{lr} / {fmt(r['adam_lr'], '.4g')}" if r.get("adam_lr") is not None else lr


def scaling_markdown(summary: dict[str, Any]) -> str:
    """The summary as markdown: the per-batch table, B_simple per batch, and every run."""
    rows = []
    for r in summary["rows"]:
        if "run_id" not in r:
            rows.append([str(r["batch"]), r["label"], "—", str(r["runs"]), f"all {r['status']}", *["—"] * 8])
            continue
        rows.append([str(r["batch"]), r["label"], f"{r['micro']}×{r['gas']}", str(r["runs"]), _lr(r),
                     fmt(r["warmup"], "g"), str(r["steps"]), f"{r['val_loss']:.4f}",
                     fmt(r["steps_to_target"], "d") if r["reached"] else "not reached",
                     fmt(r["time_to_target_s"], ".1f"), fmt(r["steps_ratio"], ".2f"), fmt(r["time_ratio"], ".2f"),
                     fmt(r["noise_at_target"], ".0f")])  # fmt: skip
    noise = ", ".join(f"B={b}: {fmt(v, '.0f')}" for b, v in summary["noise_by_batch"].items())
    grid = []
    for r in summary["records"]:
        res = r.get("result") or {}
        grid.append([r["run_id"], r["status"] + (" (reused)" if r.get("reused") else ""), _lr(r),
                     fmt(r.get("warmup"), "g"), fmt(res.get("val_loss"), ".4f"), fmt(res.get("steps_to_target"), "d"),
                     fmt(res.get("time_to_target_s"), ".1f"), fmt(res.get("noise_scale_B_simple_at_target"), ".0f"),
                     fmt(res.get("noise_scale_B_simple"), ".0f"), f"{r['wall_s']:.0f}"])  # fmt: skip
    return "\n".join([f"Target: validation loss {summary['target_loss']:g} (steps / training time to the first "
                      "evaluation at or below it; ratios to the best baseline at the same batch).", "",
                      report.markdown(HEADER, rows), "",
                      f"B_simple (median over each batch's runs, at the target where measured): {noise or '—'}", "",
                      "All runs:", "", report.markdown(GRID_HEADER, grid), ""])  # fmt: skip


def scaling_figure(summary: dict[str, Any], path: Path) -> Path:
    """Write the figure (steps to target vs batch with the ideal linear-scaling lines; time to target vs batch;
    both log-log, one line per optimizer) to ``path`` and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(10, 4))
    configs = list(dict.fromkeys(r["config"] for r in summary["rows"]))
    ideal = "ideal linear scaling"  # labelled once: the dotted line of every optimizer
    for c in configs:
        pts = sorted((r["batch"], r["steps_to_target"], r["time_to_target_s"], r["label"])
                     for r in summary["rows"] if r["config"] == c and r["reached"])  # fmt: skip
        if not pts:
            continue
        bs, ss, ts, label = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], pts[0][3]
        color = COLORS.get(label)
        line = ax_s.plot(bs, ss, "o-", color=color, label=label)[0]
        ax_s.plot(bs, [ss[0] * bs[0] / b for b in bs], ":", color=line.get_color(), label=ideal)
        ideal = "_nolegend_"
        ax_t.plot(bs, ts, "o-", color=line.get_color(), label=label)
    batches = sorted({r["batch"] for r in summary["rows"]})
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    for ax, what in ((ax_s, "optimizer steps"), (ax_t, "training time (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set(xlabel="global batch (sequences)", ylabel=f"{what} to val loss {summary['target_loss']:g}")
        ax.grid(alpha=0.3, which="both")
        report._legend_or_note(ax)  # the sweep report's: a legend, or "no run reached the target"
    ax_s.set_title("Steps to target (best LR per batch)", fontsize=10)
    ax_t.set_title("Time to target (evaluation excluded)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    return report._save(fig, path)  # the sweep report's PNG writer (256-colour palette)
