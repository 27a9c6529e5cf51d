"""Tables, figures and W&B images of a finished scaling sweep (``<out>/results.json``,
:mod:`ds_spngd_lab.sweep.runner`).

Per optimizer and global batch B the sweep tried several learning rates; the report picks, **per metric**, the best of
them (the LR is tuned per batch size by the sweep itself, as in Shallue et al. 2018, arXiv:1811.03600): the highest
final test top-1 for the accuracy columns and figure, the fewest optimizer steps to the target accuracy for the
steps / time columns and figures. Every run is listed in the LR-grid table.

Steps to target against batch size are compared with

* **perfect scaling**: S(B) = S(B₀)·B₀/B from the smallest batch B₀ at which the optimizer reached the target;
* **the noise-scale prediction** of McCandlish et al. 2018 (arXiv:1812.06162, Eq. 2.11): S = S_min·(1 + B_noise/B),
  with B_noise the *measured* simple noise scale B_simple (``noise_scale_B_simple_at_target`` of the runs'
  ``result.json``, :mod:`ds_spngd.integrations.deepspeed.noise_scale`: the median over the runs of its value at the
  evaluation that first reached the target, :func:`measured_noise_scale`) and S_min fitted per optimizer by
  least squares in log space, log S_min = mean_i(log S_i − log(1 + B_noise/B_i)). For reference the two-parameter
  least-squares fit S_i ≈ a + c/B_i (a = S_min, c = S_min·B_noise) gives a fitted B_noise = c/a.

Aims (issue 9): the largest batch at which a method "stays within 0.5% of its small-batch test accuracy" is the
largest swept B such that every swept batch up to B has final top-1 ≥ (top-1 at the smallest batch) − 0.005
(0.5 percentage points); and SP-NGD's steps to target over the best first-order method's at every B ≥ 2048.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

__all__ = ["aims", "best_by_accuracy", "best_by_steps", "fit_b_noise", "fit_s_min", "largest_stable_batch",
           "load_records", "log_to_wandb", "make_figures", "measured_noise_scale", "predicted_steps", "retarget",
           "write_report"]  # fmt: skip

FIRST_ORDER = ("sgd", "lars", "lamb")
COLORS = {"sgd": "tab:blue", "lars": "tab:orange", "lamb": "tab:green", "spngd": "tab:red"}
Key = tuple[str, int]  # (optimizer, world)


def load_records(out_dir: Path) -> list[dict[str, Any]]:
    """The run records of ``<out>/results.json`` (one per grid point)."""
    return list(json.loads((Path(out_dir) / "results.json").read_text(encoding="utf-8")))


def retarget(records: Sequence[dict[str, Any]], target_acc: float) -> list[dict[str, Any]]:
    """Copies of ``records`` whose steps / time / epochs to target are recomputed for ``target_acc`` from each run's
    evaluations (``result["evals"]``: step, training seconds, top-1), so one sweep can be reported at several targets.
    B_simple at the target is kept only where the run was measured at that same target."""
    out = []
    for r in records:
        res = r.get("result")
        if not res or res.get("target_acc") == target_acc:
            out.append(r)
            continue
        hit = next(((int(e[0]), float(e[1])) for e in res.get("evals", []) if e[2] >= target_acc), None)
        spe = res.get("steps_per_epoch")
        new = {**res, "target_acc": target_acc, "steps_to_target": hit[0] if hit else None,
               "time_to_target_s": hit[1] if hit else None,
               "epochs_to_target": hit[0] / spe if hit and spe else None, "noise_scale_B_simple_at_target": None}
        out.append({**r, "result": new})
    return out


def _ok(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("status") == "ok" and r.get("result")]


def _groups(records: Sequence[dict[str, Any]]) -> dict[Key, dict[int, list[dict[str, Any]]]]:
    out: dict[Key, dict[int, list[dict[str, Any]]]] = {}
    for r in _ok(records):
        out.setdefault((r["optimizer"], int(r["world"])), {}).setdefault(int(r["batch"]), []).append(r)
    return out


def best_by_accuracy(records: Sequence[dict[str, Any]]) -> dict[Key, dict[int, dict[str, Any]]]:
    """Per (optimizer, world) and batch, the run with the highest final test top-1 (ties: fewer steps to target)."""
    def rank(r: dict[str, Any]) -> tuple[float, float]:
        steps = r["result"].get("steps_to_target")
        return (float(r["result"]["test_top1"]), -float(steps) if steps is not None else -math.inf)

    return {k: {b: max(rs, key=rank) for b, rs in by_b.items()} for k, by_b in _groups(records).items()}


def best_by_steps(records: Sequence[dict[str, Any]]) -> dict[Key, dict[int, dict[str, Any]]]:
    """Per (optimizer, world) and batch, the run that reached the target in the fewest optimizer steps (ties: less
    training time); batches where no LR reached it are absent."""
    out: dict[Key, dict[int, dict[str, Any]]] = {}
    for k, by_b in _groups(records).items():
        for b, rs in by_b.items():
            reached = [r for r in rs if r["result"].get("steps_to_target") is not None]
            if reached:
                out.setdefault(k, {})[b] = min(reached, key=lambda r: (r["result"]["steps_to_target"],
                                                                       r["result"]["time_to_target_s"]))
    return out


def measured_noise_scale(records: Sequence[dict[str, Any]]) -> float | None:
    """Median of the positive B_simple values measured when each run first reached the target
    (``noise_scale_B_simple_at_target``); without any, the median of the positive final values; None if none.

    The final value is a poor stand-in: late in training |G|² is small and its unbiased two-batch estimate is
    noisy (it can come out negative on 2 ranks), so B_simple = S/|G|² there can be anything."""
    def values(key: str) -> list[float]:
        vals = (r["result"].get(key) for r in _ok(records))
        return [float(v) for v in vals if isinstance(v, (int, float)) and math.isfinite(v) and v > 0]

    vals = values("noise_scale_B_simple_at_target") or values("noise_scale_B_simple")
    return statistics.median(vals) if vals else None


def predicted_steps(s_min: float, b_noise: float, batch: float) -> float:
    """McCandlish et al. 2018, Eq. 2.11: S = S_min · (1 + B_noise / B)."""
    return s_min * (1.0 + b_noise / batch)


def fit_s_min(batches: Sequence[float], steps: Sequence[float], b_noise: float) -> float:
    """S_min of Eq. 2.11 for a given B_noise, least squares in log space: exp(mean(log S_i − log(1 + B_noise/B_i)))."""
    if not batches or len(batches) != len(steps):
        raise ValueError("need as many steps as batches, at least one")
    pairs = zip(batches, steps, strict=True)
    return math.exp(statistics.fmean(math.log(s) - math.log1p(b_noise / b) for b, s in pairs))


def fit_b_noise(batches: Sequence[float], steps: Sequence[float]) -> tuple[float, float] | None:
    """(S_min, B_noise) of the least-squares fit S_i ≈ a + c/B_i (a = S_min, c = S_min·B_noise); None with fewer
    than two distinct batches or a fit with a ≤ 0 or c < 0 (no noise-scale shape)."""
    xs = [1.0 / b for b in batches]
    if len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(steps)
    c = sum((x - mx) * (y - my) for x, y in zip(xs, steps, strict=True)) / sum((x - mx) ** 2 for x in xs)
    a = my - c * mx
    return (a, c / a) if a > 0 and c >= 0 else None


def largest_stable_batch(acc: dict[int, float], tol: float = 0.005, batches: Sequence[int] = ()) -> int | None:
    """Largest batch B such that every batch up to B has accuracy ≥ acc(smallest batch) − ``tol``; None if the
    smallest batch has no accuracy. ``batches``: every swept batch (default: those in ``acc``); one missing from
    ``acc`` (every LR diverged or failed there) fails the test."""
    swept = sorted(set(batches) | set(acc))
    if not swept or swept[0] not in acc:
        return None
    floor, best = acc[swept[0]] - tol, swept[0]
    for b in swept:
        if b not in acc or acc[b] < floor - 1e-12:
            break
        best = b
    return best


def aims(records: Sequence[dict[str, Any]], world: int, min_batch_for_steps: int = 2048) -> dict[str, Any]:
    """The two issue-9 aims at one world size (see the module docstring). Keys: ``stable_batch`` (per optimizer),
    ``best_first_order_stable_batch``, ``stable_ratio`` (SP-NGD / best first-order), ``aim1_met``, ``steps_ratio``
    (per batch ≥ ``min_batch_for_steps``: SP-NGD's fewest steps to target / the fewest of any first-order method;
    None where SP-NGD missed the target, which fails the aim; 0.0 where only SP-NGD reached it), ``aim2_met``."""
    acc = best_by_accuracy(records)
    steps = best_by_steps(records)
    swept = sorted({int(r["batch"]) for r in records if int(r["world"]) == world})
    stable = {o: largest_stable_batch({b: r["result"]["test_top1"] for b, r in by_b.items()}, batches=swept)
              for (o, w), by_b in acc.items() if w == world}  # fmt: skip
    fo = [v for o in FIRST_ORDER if (v := stable.get(o)) is not None]
    best_fo = max(fo) if fo else None
    sp = stable.get("spngd")
    ratio = sp / best_fo if sp is not None and best_fo else None
    ratios: dict[int, float | None] = {}
    batches = sorted({b for (o, w), by_b in acc.items() if w == world for b in by_b if b >= min_batch_for_steps})
    for b in batches:
        sp_r = steps.get(("spngd", world), {}).get(b)
        fo_steps = [steps[(o, world)][b]["result"]["steps_to_target"] for o in FIRST_ORDER
                    if b in steps.get((o, world), {})]  # fmt: skip
        if sp_r is None:
            ratios[b] = None
        elif not fo_steps:
            ratios[b] = 0.0  # only SP-NGD reached the target: better than any finite ratio
        else:
            ratios[b] = sp_r["result"]["steps_to_target"] / min(fo_steps)
    return {"stable_batch": stable, "best_first_order_stable_batch": best_fo, "stable_ratio": ratio,
            "aim1_met": ratio is not None and ratio >= 4, "steps_ratio": ratios,
            "aim2_met": bool(ratios) and all(v is not None and v <= 0.5 for v in ratios.values())}  # fmt: skip


def _ratio_text(v: float | None) -> str:
    if v is None:
        return "SP-NGD did not reach the target"
    return "only SP-NGD reached the target" if v == 0.0 else f"{v:.2f}"


def _order(opt: str) -> int:
    return list(COLORS).index(opt) if opt in COLORS else len(COLORS)


def _label(records: Sequence[dict[str, Any]], opt: str) -> str:
    return next((r["optimizer_label"] for r in records if r["optimizer"] == opt), opt)


def _fmt(v: Any, spec: str) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def summary_rows(records: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Rows of the main table: optimizer, world, batch, micro × gas, accuracy-tuned LR, final top-1, Δ vs the
    smallest batch, steps-tuned LR, steps / epochs / training time to target and B_simple at the target (both of
    the steps-tuned run)."""
    acc, steps = best_by_accuracy(records), best_by_steps(records)
    cells: dict[Key, set[int]] = {}
    for r in records:
        cells.setdefault((r["optimizer"], int(r["world"])), set()).add(int(r["batch"]))
    rows = []
    for (opt, world), swept in sorted(cells.items(), key=lambda kv: (kv[0][1], _order(kv[0][0]))):
        by_b = acc.get((opt, world), {})
        base = by_b[min(by_b)]["result"]["test_top1"] if by_b else math.nan
        for b in sorted(swept):
            if b not in by_b:
                failed = sorted({r["status"] for r in records if (r["optimizer"], r["world"], r["batch"]) ==
                                 (opt, world, b)})  # fmt: skip
                rows.append([_label(records, opt), str(world), str(b), "—", f"all LRs {'/'.join(failed)}",
                             *["—"] * (len(SUMMARY_HEADER) - 5)])
                continue
            r, s = by_b[b], steps.get((opt, world), {}).get(b)
            res, sres = r["result"], s["result"] if s else {}
            rows.append([_label(records, opt), str(world), str(b), f"{r['micro']}×{r['gas']}",
                         f"{r['lr']:.4g} (×{r['lr_mult']:g})", f"{100 * res['test_top1']:.2f}%",
                         f"{100 * (res['test_top1'] - base):+.2f}",
                         f"{s['lr']:.4g} (×{s['lr_mult']:g})" if s else "—",
                         _fmt(sres.get("steps_to_target"), "d"), _fmt(sres.get("epochs_to_target"), ".2f"),
                         _fmt(sres.get("time_to_target_s"), ".1f"),
                         _fmt(sres.get("noise_scale_B_simple_at_target"), ".0f")])
    return rows


SUMMARY_HEADER = ["optimizer", "world", "batch", "micro×gas", "lr (best top-1)", "final test top-1",
                  "Δ vs smallest batch (pp)", "lr (fewest steps)", "steps to target", "epochs to target",
                  "train time to target (s)", "B_simple at target"]  # fmt: skip


def grid_rows(records: Sequence[dict[str, Any]]) -> list[list[str]]:
    """One row per run of the grid: optimizer, world, batch, LR multiplier, peak LR, status, final top-1, steps to
    target, launch wall time; ordered by world size, optimizer, batch and multiplier."""
    rows = []
    for r in sorted(records, key=lambda r: (r["world"], _order(r["optimizer"]), r["batch"], r["lr_mult"])):
        res = r.get("result") or {}
        top1 = res.get("test_top1")
        rows.append([r["optimizer_label"], str(r["world"]), str(r["batch"]), f"{r['lr_mult']:g}", f"{r['lr']:.4g}",
                     r["status"], f"{100 * top1:.2f}%" if top1 is not None else "—",
                     _fmt(res.get("steps_to_target"), "d"), f"{r['wall_s']:.0f}"])
    return rows


GRID_HEADER = ["optimizer", "world", "batch", "lr ×", "peak lr", "status", "final test top-1", "steps to target",
               "launch wall (s)"]  # fmt: skip


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def make_figures(records: Sequence[dict[str, Any]], out_dir: Path, target_acc: float) -> list[Path]:
    """Write ``test_error_vs_batch.png``, ``steps_to_target_vs_batch.png`` and ``time_to_target_vs_batch.png``
    (100 dpi) to ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    acc, steps = best_by_accuracy(records), best_by_steps(records)
    worlds = {w for _, w in acc}
    name = (lambda o, w: f"{_label(records, o)} (w{w})") if len(worlds) > 1 else (lambda o, w: _label(records, o))
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    order = lambda kv: (kv[0][1], _order(kv[0][0]))  # noqa: E731
    for (o, w), by_b in sorted(acc.items(), key=order):
        bs = sorted(by_b)
        lost = sorted({int(r["batch"]) for r in records if r["optimizer"] == o and int(r["world"]) == w} - set(bs))
        note = f" (no run finished at B = {', '.join(map(str, lost))})" if lost else ""
        ax.plot(bs, [100 * (1 - by_b[b]["result"]["test_top1"]) for b in bs], "o-", color=COLORS.get(o),
                label=name(o, w) + note)
    ax.set(xscale="log", xlabel="global batch size", ylabel="final test error (%)",
           title="Test error vs batch (best LR per batch)")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    _legend_or_note(ax)
    paths.append(_save(fig, out_dir / "test_error_vs_batch.png"))

    b_noise = measured_noise_scale(records)
    keys = sorted(steps, key=lambda k: (k[1], _order(k[0])))
    swept = sorted({int(r["batch"]) for r in records})
    lo, hi = (min(swept), max(swept)) if swept else (1, 2)
    grid = [2 ** (k / 8) for k in range(int(8 * math.log2(lo)), int(8 * math.log2(hi)) + 1)]
    cols = 2 if len(keys) > 1 else 1
    nrows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False, sharex=True, sharey=True)
    for ax, (o, w) in zip(axes.flat[: len(keys)], keys, strict=True):
        bs = sorted(steps[(o, w)])
        ss = [steps[(o, w)][b]["result"]["steps_to_target"] for b in bs]
        ax.plot(bs, ss, "o-", color=COLORS.get(o), label="measured (best LR)")
        ax.plot(grid, [ss[0] * bs[0] / b for b in grid], ":", color="gray", label="perfect scaling")
        if b_noise is not None and b_noise > 0:
            s_min = fit_s_min(bs, ss, b_noise)
            ax.plot(grid, [predicted_steps(s_min, b_noise, b) for b in grid], "--", color="black",
                    label=f"S_min(1+B_noise/B), B_noise={b_noise:.0f}")
        budget = sorted({(int(r["batch"]), int(r["result"]["steps"])) for r in _ok(records)
                         if r["optimizer"] == o and int(r["world"]) == w and r["result"].get("steps")})  # fmt: skip
        if budget:
            ax.plot(*zip(*budget, strict=True), "-.", color="tab:purple", lw=1, label="steps in the epoch budget")
        missed = [b for b in swept if b not in steps[(o, w)] and any(
            r["optimizer"] == o and int(r["world"]) == w and int(r["batch"]) == b for r in records)]
        if missed:
            ax.text(0.03, 0.04, "not reached at B = " + ", ".join(map(str, missed)), transform=ax.transAxes,
                    fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(name(o, w), fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    if not keys:
        _legend_or_note(axes[0, 0])
    for ax in axes[-1]:
        ax.set_xlabel("global batch size")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"steps to {100 * target_acc:.0f}% top-1")
    fig.suptitle("Steps to target vs batch", fontsize=11)
    paths.append(_save(fig, out_dir / "steps_to_target_vs_batch.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for (o, w), by_b in sorted(steps.items(), key=order):
        bs = sorted(by_b)
        ax.plot(bs, [by_b[b]["result"]["time_to_target_s"] for b in bs], "o-", color=COLORS.get(o), label=name(o, w))
    ax.set(xlabel="global batch size", ylabel="training time to target (s)",
           title=f"Time to {100 * target_acc:.0f}% top-1 (eval excluded)")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    _legend_or_note(ax)
    paths.append(_save(fig, out_dir / "time_to_target_vs_batch.png"))
    return paths


def _legend_or_note(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no run reached the target", ha="center", va="center", transform=ax.transAxes)


def _save(fig: Any, path: Path) -> Path:
    import io

    import matplotlib.pyplot as plt
    from PIL import Image  # a matplotlib dependency

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    plt.close(fig)
    buf.seek(0)
    with Image.open(buf) as img:  # a 256-colour palette keeps a figure well under 100 KB for the repository
        img.convert("RGB").quantize(colors=256).save(path, optimize=True)
    return path


def write_report(records: Sequence[dict[str, Any]], out_dir: Path, target_acc: float) -> tuple[Path, list[Path]]:
    """Write ``summary.md`` (main table, aims, noise scale, LR grid) and the figures into ``out_dir``."""
    figures = make_figures(records, out_dir, target_acc)
    b_noise = measured_noise_scale(records)
    lines = [f"Target: {100 * target_acc:.2f}% test top-1.", "", markdown(SUMMARY_HEADER, summary_rows(records)), ""]
    at_target = any(isinstance(r["result"].get("noise_scale_B_simple_at_target"), (int, float)) for r in _ok(records))
    where = ("B_simple at the target over the runs that reached it" if at_target else
             "positive B_simple at the end of the runs (none was measured at this target)")
    lines.append(f"Measured noise scale B_noise = median {where}: {_fmt(b_noise, '.0f')}.")
    for (o, w), by_b in sorted(best_by_steps(records).items()):
        bs = sorted(by_b)
        ss = [by_b[b]["result"]["steps_to_target"] for b in bs]
        fit = fit_b_noise(bs, ss)
        s_min = fit_s_min(bs, ss, b_noise) if b_noise is not None else None
        fitted = f"; free fit S_min {fit[0]:.1f}, B_noise {fit[1]:.0f}" if fit else ""
        lines.append(f"- {_label(records, o)} (w{w}): S_min {_fmt(s_min, '.1f')} at the measured B_noise{fitted}")
    for w in sorted({int(r["world"]) for r in _ok(records)}):
        a = aims(records, w)
        stable = ", ".join(f"{_label(records, o)} {v}" for o, v in a["stable_batch"].items())
        ratios = ", ".join(f"B={b}: {_ratio_text(v)}" for b, v in a["steps_ratio"].items()) or "no batch ≥ 2048"
        lines += ["", f"Aims at world size {w}:",
                  f"- largest batch within 0.5 pp of the smallest batch's top-1: {stable}; SP-NGD / best first-order "
                  f"= {_fmt(a['stable_ratio'], '.2f')} (aim ≥ 4: {'met' if a['aim1_met'] else 'missed'})",
                  f"- SP-NGD steps / best first-order steps: {ratios} (aim ≤ 0.5 at every B ≥ 2048: "
                  f"{'met' if a['aim2_met'] else 'missed'})"]  # fmt: skip
    lines += ["", "All runs (the LR grid):", "", markdown(GRID_HEADER, grid_rows(records)), ""]
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path, figures


def log_to_wandb(records: Sequence[dict[str, Any]], figures: Sequence[Path], out_dir: Path, project: str,
                 group: str, mode: str, config: dict[str, Any] | None = None, name: str | None = None) -> str | None:
    """Log the figures (as ``wandb.Image``) and both tables to a summary run (``name``, default
    ``<group>-summary``) of the sweep's group; returns the run's local folder (None with mode ``disabled``)."""
    if mode == "disabled":
        return None
    import wandb

    settings = wandb.Settings(silent=True, console="off")
    run = wandb.init(project=project, group=group, name=name or f"{group}-summary", job_type="summary",
                     dir=str(out_dir), mode=cast(Any, mode), config=config or {},  # mode: runner.wandb_mode's
                     settings=settings)
    run.log({f"figures/{p.stem}": wandb.Image(str(p)) for p in figures})
    tables = {"summary_table": (SUMMARY_HEADER, summary_rows(records)), "lr_grid": (GRID_HEADER, grid_rows(records))}
    run.log({key: wandb.Table(columns=list[Any](head), data=rows) for key, (head, rows) in tables.items()})
    folder = str(run.dir)
    run.finish()
    wandb.teardown()  # finish() can return before the service has written the run's file; this waits for it
    return folder
