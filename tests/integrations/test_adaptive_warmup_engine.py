"""AdaptiveWarmup through ``ds_spngd.initialize`` on 2 gloo ranks of real DeepSpeed, each rank on different data
(ds_spngd.integrations.deepspeed.schedulers): every rank observes the same all-reduced step loss, ends warmup on the
same step and follows the same LR sequence — with SP-NGD and LARS (client optimizers) and DeepSpeed's own SGD / AdamW
built from the JSON (AdamW also at ZeRO 2 + bf16); gradient accumulation; a DeepSpeed checkpoint resumes the schedule
exactly; the monitor gets the scalars.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from ds_spngd.integrations.deepspeed.schedulers import is_adaptive_warmup_config, take_adaptive_warmup
from ds_spngd.schedules import AdaptiveWarmupConfigError
from tests.support.harness import TESTS, free_port, rank_env, remove_shm_buffers, run_procs

WORKER = TESTS / "adaptive_warmup_worker.py"
WORLD = 2
STEPS = 80  # cap: 40 warmup steps
SCHED = {"total_num_steps": STEPS, "min_lr_ratio": 1e-4, "check_every": 2, "min_points": 8, "window": 40,
         "patience": 2}
CASES = [
    {"name": "sgd", "optimizer": {"type": "SGD", "params": {"lr": 20.0, "momentum": 0.9}}, "gas": 2},
    {"name": "sgd_resumed", "optimizer": {"type": "SGD", "params": {"lr": 20.0, "momentum": 0.9}}, "gas": 2,
     "resume_at": 30},
    {"name": "adamw", "optimizer": {"type": "AdamW", "params": {"lr": 5.0}}},
    {"name": "spngd", "optimizer": {"type": "SPNGD", "params": {"lr": 20.0, "momentum": 0.9, "damping": 0.03}}},
    {"name": "lars", "optimizer": {"type": "LARS", "params": {"lr": 150.0, "momentum": 0.9,
                                                              "trust_coefficient": 0.02}}},
    {"name": "adamw_zero2_bf16", "optimizer": {"type": "AdamW", "params": {"lr": 5.0}},
     "extra": {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}},
]
RULE_CASES = ["sgd", "adamw", "spngd", "lars", "adamw_zero2_bf16"]


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("adaptive_warmup")
    cases = [{**c, "steps": STEPS, "scheduler": SCHED} for c in CASES]
    cases[2]["extra"] = {"csv_monitor": {"enabled": True, "output_path": str(out / "csv"), "job_name": "aw"}}
    assert cases[2]["name"] == "adamw"
    port = free_port()
    cmd = [sys.executable, str(WORKER), str(out), json.dumps(cases)]
    try:
        results = run_procs([cmd] * WORLD, [rank_env(r, WORLD, port) for r in range(WORLD)], 240.0, out / "logs")
    finally:
        remove_shm_buffers(port)
    for r, res in enumerate(results):
        assert res.returncode == 0, f"rank {r} {res.status()}:\n{res.tail(4000)}"
    recs = {c["name"]: [json.loads((out / f"{c['name']}.r{k}.json").read_text()) for k in range(WORLD)] for c in CASES}
    recs["_csv"] = [{"dir": str(out / "csv" / "aw")}]
    return recs


@pytest.mark.parametrize("name", [c["name"] for c in CASES])
def test_ranks_end_warmup_on_the_same_step(records: dict[str, list[dict[str, Any]]], name: str) -> None:
    r0, r1 = records[name]
    assert r0["scheduler_type"] == "AdaptiveWarmup"
    assert r0["local"][0] != r1["local"][0]  # the ranks' own losses differ
    found = r0["warmup_steps_found"]
    assert found is not None and found < r0["max_warmup_steps"] == STEPS // 2, "warmup must end before its cap here"
    assert (r1["warmup_steps_found"], r1["peak_lr"]) == (found, r0["peak_lr"])
    assert r0["lrs"] == r1["lrs"]
    assert r0["observed_steps"] == r1["observed_steps"] and r0["observed_losses"] == r1["observed_losses"]


@pytest.mark.parametrize("name", RULE_CASES)
def test_the_observed_loss_is_the_steps_mean_over_ranks(records: dict[str, list[dict[str, Any]]], name: str) -> None:
    r0, _ = records[name]
    assert r0["observed_steps"] == list(range(r0["warmup_steps_found"]))  # one loss per warmup step
    for step, loss in zip(r0["observed_steps"], r0["observed_losses"], strict=True):
        assert loss == pytest.approx(r0["agreed"][step], rel=1e-12, abs=1e-12), step


@pytest.mark.parametrize("name", RULE_CASES)
def test_lr_sequence_follows_the_rule(records: dict[str, list[dict[str, Any]]], name: str) -> None:
    r0, _ = records[name]
    base = CASES[[c["name"] for c in CASES].index(name)]["optimizer"]["params"]["lr"]
    found, peak, lrs = r0["warmup_steps_found"], r0["peak_lr"], r0["lrs"]
    growth = (1 / SCHED["min_lr_ratio"]) ** (1 / (STEPS // 2))
    for t in range(found):
        assert lrs[t] == pytest.approx(base * 1e-4 * growth**t, rel=1e-9)
    assert peak <= lrs[found - 1] * (1 + 1e-9)  # the peak is the LR where the smoothed loss was lowest
    for t in range(found, STEPS):
        assert lrs[t] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * (t - found) / (STEPS - found))))


def test_checkpoint_resumes_the_schedule(records: dict[str, list[dict[str, Any]]]) -> None:
    full, resumed = records["sgd"][0], records["sgd_resumed"][0]
    assert resumed["lrs"] == full["lrs"]
    assert (resumed["warmup_steps_found"], resumed["peak_lr"]) == (full["warmup_steps_found"], full["peak_lr"])


def test_monitor_gets_the_scalars(records: dict[str, list[dict[str, Any]]]) -> None:
    logs = Path(records["_csv"][0]["dir"])
    names = sorted(p.name for p in logs.glob("AdaptiveWarmup_*.csv"))
    assert names == ["AdaptiveWarmup_loss.csv", "AdaptiveWarmup_lr.csv", "AdaptiveWarmup_peak_lr.csv",
                     "AdaptiveWarmup_warmup_steps.csv"]
    rows = (logs / "AdaptiveWarmup_warmup_steps.csv").read_text().splitlines()
    assert float(rows[-1].split(",")[-1]) == records["adamw"][0]["warmup_steps_found"]


def test_section_is_taken_out_and_validated() -> None:
    cfg = {"optimizer": {"type": "SGD"}, "scheduler": {"type": "adaptivewarmup", "params": {"total_num_steps": 9}}}
    assert is_adaptive_warmup_config(cfg)
    taken = copy.deepcopy(cfg)
    params = take_adaptive_warmup(taken)
    assert params is not None and params.total_num_steps == 9 and "scheduler" not in taken
    other = {"scheduler": {"type": "WarmupLR", "params": {}}}
    assert take_adaptive_warmup(other) is None and "scheduler" in other
    for bad, named in [({"type": "AdaptiveWarmup", "params": {"total_num_steps": "auto"}}, "total_num_steps"),
                       ({"type": "AdaptiveWarmup", "parms": {}}, "scheduler.parms: unknown key"),
                       ({"type": "AdaptiveWarmup", "params": {"total_num_steps": 9, "patience": 0}}, "patience")]:
        with pytest.raises(AdaptiveWarmupConfigError, match=named):
            take_adaptive_warmup({"scheduler": bad})


def test_lab_resolves_the_shipped_config() -> None:
    from ds_spngd_lab.schedules.scaling import resolve_config

    raw = json.loads((TESTS.parent.parent / "ds_configs" / "sgd_adaptive_warmup.json").read_text())
    raw["scheduler"]["params"]["growth"] = "auto"  # left for the scheduler, not an unresolvable "auto"
    assert raw["scheduler"]["params"]["check_every"] == "auto"
    out = resolve_config(raw, 1024, 48, 2.5, world_size=2)
    assert out["scheduler"]["params"]["total_num_steps"] == 120
    params = take_adaptive_warmup(out)
    assert params is not None and params.total_num_steps == 120
    assert params.growth == "auto" and params.check_every == "auto"
    assert "scheduler" not in out and out["optimizer"]["type"] == "SGD"
