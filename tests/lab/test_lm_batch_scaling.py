"""Tests for the large-batch language-model grid (ds_spngd_lab.sweep.lm_scaling, benchmarks/lm_batch_scaling.py):
steps per batch, the per-batch LR grids (explicit and the square-root rule's), retargeting, the per-batch table with
ratios and B_simple, the markdown and the figure, on synthetic run records (no training run)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from ds_spngd_lab.sweep.lm_runs import parse_spec
from ds_spngd_lab.sweep.lm_scaling import (
    parse_steps_per_batch,
    plan_batch,
    retarget,
    scaled_points,
    scaling_figure,
    scaling_markdown,
    scaling_summary,
)
from tests.lab.test_lm_race import CURVE, record

STEPS = {32: 400, 128: 200, 512: 100}


def test_parse_steps_per_batch() -> None:
    assert parse_steps_per_batch("128:200,32:400") == {32: 400, 128: 200}
    for bad in ("32", "32:0", "x:1", "32:400,32:200", "32:-1"):
        with pytest.raises(ValueError):
            parse_steps_per_batch(bad)


def test_scaled_points_follow_the_square_root_rule() -> None:
    base = {"lr": 0.01, "adam_lr": 0.005, "warmup": 160}
    pts = scaled_points(base, 32, 128, 400, 200, [0.5, 1, 2])
    assert [dict(p)["lr"] for p in pts] == pytest.approx([0.01, 0.02, 0.04])  # sqrt(128/32) = 2
    assert [dict(p)["adam_lr"] for p in pts] == pytest.approx([0.005, 0.01, 0.02])
    assert all(dict(p)["warmup"] == 80 for p in pts)  # the same fraction (0.4) of a 200-step run
    no_adam = scaled_points({"lr": 0.03, "adam_lr": None, "warmup": None}, 32, 512, 400, 100, [1])
    assert no_adam == [(("lr", 0.12),)]


def test_plan_batch_explicit_default_and_scaled_grids() -> None:
    specs = [parse_spec("adamw_gpt:lr=0.005,0.01"), parse_spec("adamw_gpt@512:lr=0.1"),
             parse_spec("spngd_gpt@32:lr=0.03")]
    base = plan_batch(["adamw_gpt", "spngd_gpt", "lamb_gpt"], specs, 32, STEPS, 20, {}, [1, 2])
    assert [r.run_id for r in base] == ["b32/adamw_gpt_lr0.005", "b32/adamw_gpt_lr0.01", "b32/spngd_gpt_lr0.03",
                                        "b32/lamb_gpt"]  # fmt: skip
    assert all(r.steps == 400 and r.eval_interval == 20 for r in base)
    best = {"adamw_gpt": {"lr": 0.01, "warmup": 160}, "spngd_gpt": {"lr": 0.03, "warmup": 160}}
    mid = plan_batch(["adamw_gpt", "spngd_gpt", "lamb_gpt"], specs, 128, STEPS, 20, best, [1, 2])
    assert [r.run_id for r in mid] == ["b128/adamw_gpt_lr0.02_wu80", "b128/adamw_gpt_lr0.04_wu80",
                                       "b128/spngd_gpt_lr0.06_wu80", "b128/spngd_gpt_lr0.12_wu80",
                                       "b128/lamb_gpt"]  # fmt: skip  (lamb: no finished B0 run -> the JSON)
    big = plan_batch(["adamw_gpt"], specs, 512, STEPS, 20, best, [1, 2])
    assert [r.run_id for r in big] == ["b512/adamw_gpt_lr0.1"] and big[0].eval_interval == 5


def scaling_records() -> list[dict[str, Any]]:
    """AdamW and SP-NGD at batches 32 and 128 (two LRs each at 128), noise measured at a 2.0 target."""
    recs = [record("b32/adamw", "adamw_gpt", "AdamW", 0.01, CURVE(4.0, 3.0, 2.0, 1.9), batch=32),
            record("b32/spngd", "spngd_gpt", "SP-NGD", 0.03, CURVE(4.0, 2.5, 1.9, 1.8), batch=32),
            record("b128/adamw_lo", "adamw_gpt", "AdamW", 0.02, CURVE(4.0, 2.0, 1.8), batch=128),
            record("b128/adamw_hi", "adamw_gpt", "AdamW", 0.04, CURVE(4.0, 2.9, 1.7), batch=128),
            record("b128/spngd", "spngd_gpt", "SP-NGD", 0.06, CURVE(4.0, 2.2, 2.1), batch=128)]
    for r, noise in zip(recs, (50.0, 60.0, 200.0, 300.0, None), strict=True):
        r["result"].update(target_loss=2.0, noise_scale_B_simple_at_target=noise, noise_scale_B_simple=7.0)
    return recs


def test_retarget_recomputes_steps_and_drops_noise_of_another_target() -> None:
    recs = retarget(scaling_records(), 2.0)
    assert recs[0]["result"]["steps_to_target"] == 40 and recs[0]["result"]["noise_scale_B_simple_at_target"] == 50
    other = retarget(scaling_records(), 1.85)
    assert other[0]["result"]["steps_to_target"] is None and other[1]["result"]["steps_to_target"] == 60
    assert other[1]["result"]["noise_scale_B_simple_at_target"] is None


def test_scaling_summary_rows_ratios_and_noise() -> None:
    s = scaling_summary(scaling_records(), 2.0)
    rows = {(r["batch"], r["config"]): r for r in s["rows"]}
    assert rows[(32, "adamw_gpt")]["steps_to_target"] == 40 and rows[(32, "spngd_gpt")]["steps_to_target"] == 40
    fast = rows[(128, "adamw_gpt")]  # fewest steps to target, not the lowest final loss (adamw_hi ends lower)
    assert fast["run_id"] == "b128/adamw_lo" and fast["steps_to_target"] == 20 and fast["runs"] == 2
    missed = rows[(128, "spngd_gpt")]
    assert not missed["reached"] and missed["steps_to_target"] is None and missed["val_loss"] == 2.1
    assert rows[(32, "spngd_gpt")]["steps_ratio"] == 1.0 and missed["steps_ratio"] is None
    assert s["noise_by_batch"][32] == pytest.approx(55.0) and s["noise_by_batch"][128] == pytest.approx(250.0)
    text = scaling_markdown(s)
    assert "not reached" in text and "B=128: 250" in text and "b128/adamw_hi" in text


def test_scaling_figure_is_written(tmp_path: Path) -> None:
    s = scaling_summary(scaling_records(), 2.0)
    path = scaling_figure(s, tmp_path / "fig" / "batch_scaling.png")
    assert path.exists() and path.stat().st_size > 1000
    nothing = scaling_summary(scaling_records(), 0.5)  # no run reaches it: the figure still says so
    assert all(not r["reached"] for r in nothing["rows"]) and scaling_figure(nothing, tmp_path / "n.png").exists()
    assert all(math.isfinite(r["val_loss"]) for r in nothing["rows"])
