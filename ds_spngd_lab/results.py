"""Results of the reference training scripts (train.py, train_lm.py), written by rank 0: the per-step CSV
(:class:`StepLog`), the outcome of a run (:class:`RunResult` for image classification, :class:`LMResult` for language
models), its ``result.json`` and its printed two-column table."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

STEP_COLUMNS = ("step", "samples", "loss", "lr", "wall_time_s")


class StepLog:
    """Append-only CSV of optimizer steps with columns :data:`STEP_COLUMNS`; a no-op unless ``enabled``.

    Args:
        path: CSV file to create (parent folders are created; an existing file is overwritten).
        enabled: write only when true (pass ``rank == 0``).
    """

    def __init__(self, path: Path | str, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._file: IO[str] | None = None
        self._writer: Any = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", newline="", encoding="utf-8")
            self._writer = csv.writer(self._file)
            self._writer.writerow(STEP_COLUMNS)
            self._file.flush()

    def write(self, step: int, samples: int, loss: float, lr: float, wall_time_s: float) -> None:
        """Append one row: 1-based optimizer ``step``, cumulative ``samples``, mean ``loss``, ``lr`` used by the step,
        cumulative training ``wall_time_s`` (seconds, evaluation excluded). Flushed immediately.

        Raises:
            ValueError: if the log was closed.
        """
        if not self.enabled:
            return
        if self._file is None or self._file.closed:
            raise ValueError(f"step log {self.path} is closed")
        self._writer.writerow([step, samples, f"{loss:.6g}", f"{lr:.6g}", f"{wall_time_s:.4f}"])
        self._file.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> StepLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class RunResult:
    """Outcome of one training run.

    Attributes:
        epochs: epochs trained (``steps / steps_per_epoch``, may be fractional).
        steps: optimizer steps taken.
        wall_time_s: training wall time in seconds, evaluation excluded.
        test_top1: final test top-1 accuracy in ``[0, 1]``.
        final_loss: mean training loss of the last step (all ranks and micro-batches).
        target_acc: the ``--target-acc`` threshold, or ``None``.
        steps_to_target: first evaluated step with ``test_top1 >= target_acc``, or ``None`` (not reached).
        time_to_target_s: training wall time (s) at that step, or ``None``.
        epochs_to_target: epochs at that step, or ``None``.
        evals: every evaluation as ``(step, training wall time s, test top-1)``, in order.
    """

    epochs: float
    steps: int
    wall_time_s: float
    test_top1: float
    final_loss: float
    target_acc: float | None = None
    steps_to_target: int | None = None
    time_to_target_s: float | None = None
    epochs_to_target: float | None = None
    evals: tuple[tuple[int, float, float], ...] = ()

    def to_json_dict(self) -> dict[str, Any]:
        """Plain dict for ``result.json`` (non-finite floats become ``None`` so the JSON stays standard)."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            out[key] = None if isinstance(value, float) and not math.isfinite(value) else value
        out["evals"] = [list(e) for e in self.evals]
        return out


def _fmt_target(result: RunResult) -> tuple[str, str]:
    if result.target_acc is None:
        return "target", "-"
    label = f"to {100 * result.target_acc:.2f}% top-1"
    if result.steps_to_target is None or result.time_to_target_s is None:
        return label, "not reached"
    epochs = "" if result.epochs_to_target is None else f", {result.epochs_to_target:.2f} epochs"
    return label, f"{result.steps_to_target} steps, {result.time_to_target_s:.1f} s{epochs}"


def format_table(result: RunResult, extra: dict[str, str] | None = None) -> str:
    """Aligned two-column text table of ``result`` (plus ``extra`` rows first, e.g. model / optimizer / batch)."""
    rows: list[tuple[str, str]] = list((extra or {}).items())
    per_epoch = result.wall_time_s / result.epochs if result.epochs > 0 else float("nan")
    rows += [
        ("epochs", f"{result.epochs:.2f}"),
        ("steps", str(result.steps)),
        ("train wall time", f"{result.wall_time_s:.1f} s (eval excluded)"),
        ("wall time / epoch", f"{per_epoch:.1f} s"),
        ("final train loss", f"{result.final_loss:.4f}"),
        ("test top-1", f"{100 * result.test_top1:.2f}%"),
        _fmt_target(result),
    ]
    return render_table(rows)


def render_table(rows: list[tuple[str, str]]) -> str:
    """``rows`` as an aligned two-column text table between ``+---+`` rules."""
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    rule = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
    lines = [rule] + [f"| {k.ljust(width)} | {v.ljust(vwidth)} |" for k, v in rows] + [rule]
    return "\n".join(lines)


def write_json(path: Path | str, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON with sorted keys to ``path`` (``result.json``), creating folders."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_result(path: Path | str, result: RunResult, extra: dict[str, Any] | None = None) -> None:
    """Write ``result`` (and ``extra`` keys, e.g. run settings) as indented JSON to ``path``, creating folders."""
    write_json(path, {**(extra or {}), **result.to_json_dict()})


@dataclass(frozen=True)
class LMResult:
    """Outcome of one language-model run (``result.json`` holds these keys plus the run's settings).

    Attributes:
        steps: optimizer steps taken. epochs: ``steps / steps_per_epoch``. tokens: training tokens consumed.
        wall_time_s: training wall time (s), evaluation excluded. median_step_s: median time of one optimizer step.
        val_loss: last validation loss (nats/token). final_loss: mean training loss of the last step.
        target_loss / steps_to_target / time_to_target_s: first evaluation at or below ``target_loss`` (None: not
        set or not reached). evals: ``(step, training wall time s, validation loss)`` per evaluation, step 0 first.
        peak_rss_mib: peak resident memory per rank (MiB, index = rank).
    """

    steps: int
    epochs: float
    tokens: int
    wall_time_s: float
    median_step_s: float
    val_loss: float
    final_loss: float
    target_loss: float | None
    steps_to_target: int | None
    time_to_target_s: float | None
    evals: tuple[tuple[int, float, float], ...]
    peak_rss_mib: tuple[float, ...]

    def to_json_dict(self) -> dict[str, Any]:
        """Plain dict (non-finite floats become None; tuples become lists)."""
        out = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}
        out["evals"] = [list(e) for e in self.evals]
        out["peak_rss_mib"] = list(self.peak_rss_mib)
        return out


def format_lm_table(result: LMResult, extra: dict[str, Any]) -> str:
    """Aligned two-column text table of the settings ``extra`` and ``result``."""
    target = "-"
    if result.target_loss is not None:
        target = ("not reached" if result.steps_to_target is None or result.time_to_target_s is None
                  else f"{result.steps_to_target} steps, {result.time_to_target_s:.1f} s")  # fmt: skip
    rows = [(k, str(v)) for k, v in extra.items()] + [
        ("steps", str(result.steps)), ("epochs", f"{result.epochs:.3f}"), ("tokens", str(result.tokens)),
        ("train wall time", f"{result.wall_time_s:.1f} s (eval excluded)"),
        ("median step time", f"{result.median_step_s:.3f} s"),
        ("final train loss", f"{result.final_loss:.4f}"),
        ("validation loss", f"{result.val_loss:.4f} (ppl {math.exp(min(result.val_loss, 50)):.1f})"),
        (f"to val loss {result.target_loss}" if result.target_loss is not None else "target", target),
        ("peak RSS per rank", ", ".join(f"{m:.0f} MiB" for m in result.peak_rss_mib)),
    ]  # fmt: skip
    return render_table(rows)
