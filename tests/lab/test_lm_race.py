"""Tests for the language-model race harness (ds_spngd_lab.sweep.lm_runs / lm_report, benchmarks/lm_race.py): sweep
specs, per-run JSON and environment, the resume rule (launches faked), the best-of / target / ratio logic on
synthetic records, and train_lm.py's Muon LR overrides. No training run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from ds_spngd_lab.sweep import lm_runs
from ds_spngd_lab.sweep.lm_report import best_per_config, first_reach, markdown, summarize
from ds_spngd_lab.sweep.lm_runs import LaunchSettings, LMRun, grid_points, launch_env, parse_spec, run_ds_config
from tests.support.harness import ROOT, load_script


# ---- specs, configs, arguments ------------------------------------------------------------------------------------
def test_parse_spec_and_grid() -> None:
    spec = parse_spec("muon_gpt@128:lr=0.01,0.02:warmup=80,160")
    assert (spec.config, spec.batch) == ("muon_gpt", 128)
    points = grid_points(spec.axes)
    assert points[0] == (("lr", 0.01), ("warmup", 80.0)) and len(points) == 4
    assert parse_spec("adamw_gpt").axes == {} and grid_points({}) == [()]
    assert grid_points({"warmup": [5], "lr": [1.0]}) == [(("lr", 1.0), ("warmup", 5))]  # KEYS order
    for bad in ("adamw_gpt:beta=0.9", "adamw_gpt:lr=a", "adamw_gpt:lr=0", "adamw_gpt:warmup=1.5", ":lr=1",
                "adamw_gpt@x:lr=1", "adamw_gpt:lr=1:lr=2"):
        with pytest.raises(ValueError):
            parse_spec(bad)


def test_run_id_and_train_args(tmp_path: Path) -> None:
    run = LMRun("muon_gpt", 128, 200, 10, (("lr", 0.02), ("adam_lr", 0.01), ("warmup", 80.0)), prefix="b128/")
    assert run.run_id == "b128/muon_gpt_lr0.02_alr0.01_wu80" and run.override("lr") == 0.02
    s = LaunchSettings(out=tmp_path, target_loss=1.9, extra=("--tokenizer", "char"))
    args = lm_runs.train_args(run, s, tmp_path / "c.json", tmp_path / "r")
    joined = " ".join(args)
    assert "--global-batch 128 --max-steps 200 --eval-interval 10" in joined and "--target-loss 1.9" in joined
    assert "--lr 0.02 --adam-lr 0.01 --warmup-steps 80 --tokenizer char" in joined


def test_flags_the_harness_sets_are_refused_in_extra_arguments() -> None:
    assert lm_runs.controlled_flags(["--tokenizer", "char", "--lr", "0.1", "--warmup-steps=5", "--n-layer", "2"]) == [
        "--lr", "--warmup-steps=5"]
    assert lm_runs.controlled_flags(["--tokenizer", "char", "--context", "128"]) == []


def test_run_ds_config_layout_and_noise_scale() -> None:
    raw = lm_runs.load_ds_config("adamw_gpt")
    cfg = run_ds_config(raw, 512, 2, 64, noise_scale=True)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (
        512, 64, 4)
    assert cfg["zero_optimization"]["stage"] == 0 and cfg["gradient_noise_scale"]["enabled"]
    assert raw["zero_optimization"]["stage"] == 2 and "gradient_noise_scale" not in raw  # not modified
    plain = run_ds_config(raw, 32, 2, 64, noise_scale=False)
    assert plain["zero_optimization"]["stage"] == 2 and plain["train_micro_batch_size_per_gpu"] == 16


def test_muon_runs_without_dynamo_on_cpu() -> None:
    muon = lm_runs.load_ds_config("muon_gpt")
    assert launch_env(muon, cuda=False) == {"TORCHDYNAMO_DISABLE": "1"}
    assert launch_env(muon, cuda=True) == {}
    assert launch_env(lm_runs.load_ds_config("adamw_gpt"), cuda=False) == {}


def test_lamb_gpt_config_matches_the_adamw_schedule() -> None:
    lamb, adamw = lm_runs.load_ds_config("lamb_gpt"), lm_runs.load_ds_config("adamw_gpt")
    assert lamb["optimizer"]["type"] == "Lamb" and lamb["scheduler"] == adamw["scheduler"]
    assert lamb["bf16"]["enabled"] and lamb["zero_optimization"]["stage"] == 0  # LAMB needs whole tensors


# ---- the resume rule ----------------------------------------------------------------------------------------------
def _fake_launcher(calls: list[list[str]]) -> Any:
    def fake(cmd: list[str], env: dict[str, str], log_path: Path, port: int, timeout_s: float,
             cwd: Path | None = None) -> tuple[str, int, float]:
        calls.append(list(cmd))
        out = Path(cmd[cmd.index("--out-dir") + 1])
        log_path.write_text("fake\n")
        (out / "result.json").write_text(json.dumps({"val_loss": 2.0, "steps": 4, "launches": len(calls)}))
        return "ok", 0, 1.0

    return fake


def test_result_is_reused_only_with_the_same_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(lm_runs, "run_launcher", _fake_launcher(calls))
    s = LaunchSettings(out=tmp_path)
    run = LMRun("adamw_gpt", 32, 4, 2, (("lr", 0.01),))
    first = lm_runs.launch(run, s)
    assert first["status"] == "ok" and not first["reused"] and len(calls) == 1
    again = lm_runs.launch(run, s)
    assert again["reused"] and again["result"]["launches"] == 1 and len(calls) == 1
    # another LR, budget or setting is another command: launched
    lm_runs.launch(LMRun("adamw_gpt", 32, 4, 2, (("lr", 0.02),)), s)
    lm_runs.launch(run, LaunchSettings(out=tmp_path, seed=1))
    assert len(calls) == 3
    # ... and the setting the folder now holds is the one reused
    assert lm_runs.launch(run, LaunchSettings(out=tmp_path, seed=1))["reused"] and len(calls) == 3
    # a result.json without command.json (an older harness) is not trusted
    (tmp_path / run.run_id / "command.json").unlink()
    assert not lm_runs.launch(run, s)["reused"] and len(calls) == 4


def test_failed_run_is_recorded_and_race_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(cmd: list[str], env: dict[str, str], log_path: Path, *a: Any, **k: Any) -> tuple[str, int, float]:
        log_path.write_text("FloatingPointError: non-finite training loss\n")
        return "failed", 0, 2.0

    monkeypatch.setattr(lm_runs, "run_launcher", fail)
    recs = lm_runs.run_all([LMRun("adamw_gpt", 32, 4, 2), LMRun("spngd_gpt", 32, 4, 2)], LaunchSettings(tmp_path),
                           print_fn=lambda _: None)  # fmt: skip
    assert [r["status"] for r in recs] == ["diverged", "diverged"] and recs[0]["result"] is None
    assert len(json.loads((tmp_path / "results.json").read_text())) == 2


# ---- best of each config, target, ratios --------------------------------------------------------------------------
def record(run_id: str, config: str, opt: str, lr: float, evals: list[tuple[int, float, float]],
           status: str = "ok", median: float = 0.1, batch: int = 32) -> dict[str, Any]:
    """A synthetic run record (lm_runs.launch's shape); final loss = the last evaluation's."""
    steps = evals[-1][0]
    result = {"val_loss": evals[-1][2], "steps": steps, "wall_time_s": evals[-1][1], "median_step_s": median,
              "peak_rss_mib": [500.0, 500.0], "evals": [list(e) for e in evals], "model": "gpt"}
    return {"run_id": run_id, "optimizer": config, "optimizer_label": opt, "optimizer_type": opt.lower().replace(
        "-", ""), "batch": batch, "world": 2, "micro": 16, "gas": 1, "lr": lr, "adam_lr": None, "warmup": 160,
        "status": status, "wall_s": 10.0, "result": result if status == "ok" else None}


CURVE = lambda *losses: [(20 * i, 2.0 * i, v) for i, v in enumerate(losses)]  # noqa: E731


def synthetic_race() -> list[dict[str, Any]]:
    return [record("adamw_lo", "adamw_gpt", "AdamW", 3e-3, CURVE(4.0, 3.0, 2.5, 2.2)),
            record("adamw_hi", "adamw_gpt", "AdamW", 1e-2, CURVE(4.0, 2.8, 2.2, 2.0)),
            record("muon_a", "muon_gpt", "Muon", 0.02, CURVE(4.0, 2.6, 2.0, 1.9)),
            record("muon_b", "muon_gpt", "Muon", 0.04, CURVE(4.0), status="diverged"),
            record("spngd", "spngd_gpt", "SP-NGD", 0.03, CURVE(4.0, 2.4, 1.85, 1.8), median=0.15)]


def test_best_per_config_and_target_is_the_best_baseline() -> None:
    recs = synthetic_race()
    best = best_per_config(recs)
    assert {c: r["run_id"] for c, r in best.items()} == {"adamw_gpt": "adamw_hi", "muon_gpt": "muon_a",
                                                         "spngd_gpt": "spngd"}  # fmt: skip
    s = summarize(recs)
    assert s["target_val_loss"] == 1.9 and s["reference"] == "muon_a"  # Muon beat AdamW; SP-NGD is no baseline
    assert s["baselines"] == ["adamw_gpt", "muon_gpt"]
    runs = s["runs"]
    assert runs["muon_a"]["steps_to_target"] == 60 and runs["muon_a"]["steps_ratio"] == 1.0
    assert runs["spngd"]["steps_to_target"] == 40 and runs["spngd"]["steps_ratio"] == pytest.approx(40 / 60)
    assert runs["spngd"]["time_ratio"] == pytest.approx(4.0 / 6.0)
    assert runs["spngd"]["step_time_ratio"] == pytest.approx(1.5)
    assert runs["adamw_hi"]["steps_to_target"] is None and runs["adamw_hi"]["best"]
    assert not runs["adamw_lo"]["best"] and runs["muon_b"]["status"] == "diverged" and "val_loss" not in runs["muon_b"]
    text = markdown(s)
    assert "**adamw_hi**" in text and "| adamw_lo |" in text and "diverged" in text and "1.9000" in text


def test_target_without_baselines_and_without_results() -> None:
    only = [record("s1", "spngd_gpt", "SP-NGD", 0.03, CURVE(4.0, 2.0)),
            record("s2", "spngd_gpt", "SP-NGD", 0.06, CURVE(4.0, 2.5))]
    s = summarize(only)
    assert s["reference"] == "s1" and s["target_val_loss"] == 2.0 and s["baselines"] == []
    none = summarize([record("a", "adamw_gpt", "AdamW", 0.01, CURVE(4.0), status="failed")])
    assert none["target_val_loss"] is None and "no run finished" in markdown(none)


def test_first_reach() -> None:
    evals = [[0, 0.0, 4.0], [10, 1.0, 3.0], [20, 2.0, 2.9], [30, 3.0, 3.1]]
    assert first_reach(evals, 3.0) == (10, 1.0) and first_reach(evals, 2.0) is None


# ---- train_lm.py's LR overrides -----------------------------------------------------------------------------------
def test_train_lm_lr_overrides_for_muon() -> None:
    train_lm = load_script("train_lm.py", "ds_spngd_train_lm_script")
    muon = json.loads((ROOT / "ds_configs" / "muon_gpt.json").read_text())
    args = argparse.Namespace(lr=0.04, adam_lr=0.02, warmup_steps=None)
    params = train_lm.schedule_config(muon, args, 100)["optimizer"]["params"]
    assert (params["lr"], params["muon_lr"], params["adam_lr"]) == (0.04, 0.04, 0.02)
    only_lr = train_lm.schedule_config(muon, argparse.Namespace(lr=0.01, adam_lr=None, warmup_steps=50), 100)
    assert only_lr["optimizer"]["params"]["adam_lr"] == muon["optimizer"]["params"]["adam_lr"]
    assert only_lr["scheduler"]["params"]["warmup_num_steps"] == 50
    adamw = json.loads((ROOT / "ds_configs" / "adamw_gpt.json").read_text())
    assert "muon_lr" not in train_lm.schedule_config(adamw, argparse.Namespace(lr=0.02, adam_lr=None,
                                                                              warmup_steps=None), 10)["optimizer"][
        "params"]  # fmt: skip
    with pytest.raises(ValueError, match="Muon only"):
        train_lm.schedule_config(adamw, argparse.Namespace(lr=None, adam_lr=0.01, warmup_steps=None), 10)
