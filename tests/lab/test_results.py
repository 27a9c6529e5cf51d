"""Tests for ds_spngd_lab.results: the per-step CSV, the result tables and result.json."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from ds_spngd_lab.results import STEP_COLUMNS, LMResult, RunResult, StepLog, format_lm_table, format_table, write_result


def test_step_log_writes_rows_and_flushes(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "steps.csv"
    log = StepLog(path)
    log.write(1, 1024, 2.302585, 0.1, 1.5)
    log.write(2, 2048, 1.25, 0.2, 3.0)
    rows = list(csv.reader(path.open()))  # readable before close: each row is flushed
    assert tuple(rows[0]) == STEP_COLUMNS == ("step", "samples", "loss", "lr", "wall_time_s")
    assert rows[1] == ["1", "1024", "2.30259", "0.1", "1.5000"]
    assert float(rows[2][2]) == 1.25 and len(rows) == 3
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.write(3, 3072, 1.0, 0.1, 4.0)


def test_step_log_disabled_on_other_ranks(tmp_path: Path) -> None:
    with StepLog(tmp_path / "steps.csv", enabled=False) as log:
        log.write(1, 1, 1.0, 1.0, 1.0)
    assert not (tmp_path / "steps.csv").exists()


def test_table_reports_target_reached_and_not() -> None:
    reached = RunResult(
        epochs=5.0,
        steps=240,
        wall_time_s=300.0,
        test_top1=0.9871,
        final_loss=0.05,
        target_acc=0.985,
        steps_to_target=180,
        time_to_target_s=225.25,
        epochs_to_target=3.75,
    )
    table = format_table(reached, extra={"optimizer": "SGD"})
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1  # aligned
    assert "| optimizer" in lines[1]
    assert "98.71%" in table and "60.0 s" in table and "180 steps, 225.2 s, 3.75 epochs" in table
    assert "to 98.50% top-1" in table
    missed = RunResult(epochs=1.0, steps=48, wall_time_s=60.0, test_top1=0.9, final_loss=0.3, target_acc=0.985)
    assert "not reached" in format_table(missed)
    assert "| target" in format_table(RunResult(1.0, 48, 60.0, 0.9, 0.3))


def test_result_json_round_trip(tmp_path: Path) -> None:
    result = RunResult(epochs=0.06, steps=3, wall_time_s=1.2, test_top1=0.11, final_loss=float("nan"),
                       evals=((3, 1.2, 0.11),))  # fmt: skip
    path = tmp_path / "out" / "result.json"
    write_result(path, result, extra={"model": "cnn", "world_size": 2})
    data = json.loads(path.read_text())
    assert data["steps"] == 3 and data["model"] == "cnn" and data["world_size"] == 2
    assert data["final_loss"] is None  # NaN is not valid JSON
    assert data["steps_to_target"] is None and data["target_acc"] is None
    assert math.isclose(data["test_top1"], 0.11)
    assert data["evals"] == [[3, 1.2, 0.11]]


def test_lm_table_and_json() -> None:
    result = LMResult(steps=3, epochs=0.5, tokens=384, wall_time_s=2.0, median_step_s=0.5, val_loss=2.0,
                      final_loss=float("nan"), target_loss=2.5, steps_to_target=2, time_to_target_s=1.25,
                      evals=((0, 0.0, 3.0), (2, 1.25, 2.4), (3, 2.0, 2.0)), peak_rss_mib=(512.4, 600.0))  # fmt: skip
    table = format_lm_table(result, {"model": "gpt"})
    assert len({len(line) for line in table.splitlines()}) == 1  # aligned
    assert "| model" in table and "2.0000 (ppl 7.4)" in table and "2 steps, 1.2 s" in table
    assert "to val loss 2.5" in table and "512 MiB, 600 MiB" in table
    data = result.to_json_dict()
    assert data["final_loss"] is None and data["evals"][1] == [2, 1.25, 2.4] and data["peak_rss_mib"] == [512.4, 600.0]
