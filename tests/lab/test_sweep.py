"""Tests for the scaling sweep (ds_spngd_lab.sweep): grid and per-run DeepSpeed JSON, W&B mode, /dev/shm cleanup of only
the run's own port, the report (tables, aims, McCandlish fit, figures, W&B images) from synthetic results, and one
tiny real sweep through the deepspeed launcher (2 runs on 2 CPU ranks, offline W&B)."""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from ds_spngd_lab.ranks import free_port, remove_shm_buffers, shm_buffers
from ds_spngd_lab.schedules.scaling import batch_layout, resolve_config
from ds_spngd_lab.sweep import report, runner
from ds_spngd_lab.sweep.grid import OPTIMIZERS, RunSpec, base_config, build_grid, eval_interval, micro_layout, peak_lr
from ds_spngd_lab.sweep.grid import run_config as make_config
from ds_spngd_lab.sweep.runner import launch_run, wandb_mode


# ---- grid and configs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("batch", "world", "cap", "expected"), [
    (256, 2, 2048, (128, 1)), (16384, 2, 2048, (2048, 4)), (8192, 2, 2048, (2048, 2)), (6000, 2, 2048, (1500, 2)),
    (4096, 1, 1000, (512, 8)), (12, 4, 2, (1, 3)),
])  # fmt: skip
def test_micro_layout(batch: int, world: int, cap: int, expected: tuple[int, int]) -> None:
    micro, gas = micro_layout(batch, world, cap)
    assert (micro, gas) == expected and micro * gas * world == batch and micro <= cap


def test_micro_layout_refuses_indivisible() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        micro_layout(1025, 2, 2048)
    with pytest.raises(ValueError):
        micro_layout(0, 2, 2048)


def test_grid_order_and_eval_interval() -> None:
    runs = build_grid(["sgd", "spngd"], [256, 16384], [0.5, 2], [2], 10, 2048, 50_000, 4)
    assert len(runs) == 8 and len({r.run_id for r in runs}) == 8
    assert [(r.batch, r.optimizer, r.lr_mult) for r in runs[:4]] == [(256, "sgd", 0.5), (256, "sgd", 2.0),
                                                                     (256, "spngd", 0.5), (256, "spngd", 2.0)]
    assert runs[0].eval_interval == 48  # 50000 // 256 = 195 steps per epoch, 4 evaluations per epoch
    assert runs[-1].eval_interval == 1 and (runs[-1].micro, runs[-1].gas) == (2048, 4)
    assert eval_interval(1024, 50_000, 4) == 12
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_grid(["adam"], [256], [1], [2], 1, 2048, 50_000, 4)


def _resolved_lr(cfg: dict[str, Any], batch: int, world: int) -> tuple[float, dict[str, Any]]:
    """The LR train.py will use: the config resolved exactly as train.py resolves it."""
    resolved = resolve_config(cfg, batch, 50_000 // batch, 10, world_size=world)
    return float(resolved["optimizer"]["params"]["lr"]), resolved


@pytest.mark.parametrize(("opt", "batch", "mult", "lr"), [
    ("sgd", 1024, 2.0, 2 * 0.2 * 1024 / 256),  # Goyal: linear from 0.2 @ 256
    ("lars", 16384, 0.5, 0.5 * 0.2 * 64),  # linear
    ("lamb", 4096, 0.5, 0.5 * 0.025 * 4),  # LEGW: sqrt(4096 / 256) = 4
    ("spngd", 4096, 1.0, 0.2 * 2),  # sqrt around 0.2 @ 1024
    ("spngd", 256, 2.0, 2 * 0.2 * 0.5),
])  # fmt: skip
def test_run_config_scales_the_lr(opt: str, batch: int, mult: float, lr: float) -> None:
    base = base_config(opt)
    before = json.dumps(base, sort_keys=True)
    micro, gas = micro_layout(batch, 2, 2048)
    run = RunSpec(opt, batch, mult, 2, micro, gas, 10, 1)
    cfg = make_config(run, base, "proj", "grp")
    assert json.dumps(base, sort_keys=True) == before  # the base is not modified
    got, resolved = _resolved_lr(cfg, batch, 2)
    assert got == pytest.approx(lr, rel=1e-12)
    assert peak_lr(cfg, batch) == pytest.approx(lr, rel=1e-12)
    assert batch_layout(resolved, 2) == (batch, micro, gas)
    assert cfg["wandb"] == {"enabled": True, "project": "proj", "group": "grp"}
    assert cfg["gradient_noise_scale"] == {"enabled": True, "ema": 0.95}
    assert cfg["optimizer"]["type"] == json.loads(before)["optimizer"]["type"]


def test_run_config_accumulation_warmup_and_sections() -> None:
    run = RunSpec("lamb", 16384, 1.0, 2, *micro_layout(16384, 2, 2048), 10, 1)
    cfg = make_config(run, base_config("lamb"), "p", "g", wandb=False)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (2048, 4)
    assert "wandb" not in cfg
    _, resolved = _resolved_lr(cfg, 16384, 2)
    # LEGW warm-up: 0.25 epochs at 256, scaled by B / 256 = 64 -> 16 epochs of 3 steps
    assert resolved["scheduler"]["params"]["warmup_num_steps"] == 48
    one_rank = make_config(RunSpec("sgd", 256, 1.0, 1, 256, 1, 1, 1), base_config("sgd"), "p", "g")
    assert "gradient_noise_scale" not in one_rank  # B_simple needs two ranks
    assert set(OPTIMIZERS) == {"sgd", "lars", "lamb", "spngd", "sgd_aw", "lamb_aw", "spngd_aw", "lamb_conadv",
                               "spngd_conadv", "decentlam", "dmsgd"}


@pytest.mark.parametrize(("variant", "base", "section"), [
    ("sgd_aw", "sgd", "scheduler"), ("lamb_aw", "lamb", "scheduler"), ("spngd_aw", "spngd", "scheduler"),
    ("lamb_conadv", "lamb", "adversarial"), ("spngd_conadv", "spngd", "adversarial")])
def test_variants_replace_one_section_of_their_base(variant: str, base: str, section: str) -> None:
    """The issue-18 variants are their base config with one section replaced: same optimizer and LR rule."""
    got, ref = base_config(variant), base_config(base)
    assert {k: v for k, v in got.items() if k != section} == {k: v for k, v in ref.items() if k != section}
    assert got[section] != ref.get(section)
    if section == "scheduler":
        assert got["scheduler"]["type"] == "AdaptiveWarmup"
    else:
        assert got["adversarial"]["mode"] == "conadv"


def test_decentralized_runs_get_no_noise_scale() -> None:
    """DecentLaM / DmSGD turn DeepSpeed's all-reduce off, which the gradient noise scale needs (refused there)."""
    run = RunSpec("decentlam", 4096, 1.0, 4, *micro_layout(4096, 4, 2048), 10, 1)
    assert "gradient_noise_scale" not in make_config(run, base_config("decentlam"), "p", "g")
    sgd = RunSpec("sgd", 4096, 1.0, 4, *micro_layout(4096, 4, 2048), 10, 1)
    assert make_config(sgd, base_config("sgd"), "p", "g")["gradient_noise_scale"]["enabled"]


def test_wandb_mode(tmp_path: Path) -> None:
    empty = tmp_path / "empty_netrc"
    empty.write_text("")
    assert wandb_mode("offline", {"WANDB_API_KEY": "x"}) == "offline"
    assert wandb_mode("auto", {}, str(empty)) == "offline"
    assert wandb_mode("auto", {"WANDB_MODE": "disabled", "WANDB_API_KEY": "x"}, str(empty)) == "disabled"
    assert wandb_mode("auto", {"WANDB_API_KEY": "x"}, str(empty)) == "online"
    logged_in = tmp_path / "netrc"
    logged_in.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    assert wandb_mode("auto", {}, str(logged_in)) == "online"
    assert wandb_mode("auto", {"WANDB_BASE_URL": "https://wandb.example.org"}, str(logged_in)) == "offline"
    with pytest.raises(ValueError):
        wandb_mode("sometimes", {})


# ---- /dev/shm cleanup -------------------------------------------------------------------------------------------
def _fake_buffers(port: int) -> list[Path]:
    paths = [Path(f"/dev/shm/deepspeed_allreduce_buffer_0_127.0.0.1_{port}_{r}") for r in range(2)]
    for p in paths:
        p.write_bytes(b"x")
    return paths


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_remove_shm_buffers_only_touches_its_port() -> None:
    port = free_port()
    others = [port + 1, port * 10 + port % 10 if port * 10 < 10**6 else port - 1]  # a neighbour and a longer number
    mine = _fake_buffers(port)
    theirs = [p for o in others for p in _fake_buffers(o)]
    try:
        assert [Path(p) for p in shm_buffers(port)] == mine
        assert remove_shm_buffers(port) == 2
        assert not any(p.exists() for p in mine)
        assert all(p.exists() for p in theirs)
        assert remove_shm_buffers(port) == 0
    finally:
        for p in mine + theirs:
            p.unlink(missing_ok=True)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
@pytest.mark.parametrize("how", ["fails", "times out"])
def test_launch_run_removes_its_buffers_even_when_the_run_fails(how: str, tmp_path: Path) -> None:
    port, other = free_port(), free_port()
    theirs = _fake_buffers(other)
    make = ("import pathlib, sys, time\n"
            f"[pathlib.Path('/dev/shm/deepspeed_allreduce_buffer_0_127.0.0.1_{port}_%d' % r).write_bytes(b'x') "
            "for r in range(2)]\n"
            "print('ranks up', flush=True)\n"
            + ("sys.exit(3)\n" if how == "fails" else "time.sleep(60)\n"))  # fmt: skip
    try:
        status, removed, wall = launch_run([sys.executable, "-c", make], dict(os.environ), tmp_path / "run.log", port,
                                           timeout_s=3.0)  # fmt: skip
        assert status == ("failed" if how == "fails" else "timeout")
        assert removed == 2 and shm_buffers(port) == []
        assert all(p.exists() for p in theirs)
        assert "ranks up" in (tmp_path / "run.log").read_text()
        assert wall < 30
    finally:
        remove_shm_buffers(port)
        for p in theirs:
            p.unlink(missing_ok=True)


# ---- report from synthetic results --------------------------------------------------------------------------------
S_MIN, B_NOISE = 40.0, 4096.0  # integer steps at every batch: 680, 200, 80, 50
BATCHES = (256, 1024, 4096, 16384)


def _record(opt: str, batch: int, mult: float, top1: float, steps: float | None, b_simple: float = B_NOISE,
            world: int = 2) -> dict[str, Any]:
    micro, gas = micro_layout(batch, world, 2048)
    result = {"test_top1": top1, "steps_to_target": None if steps is None else round(steps),
              "time_to_target_s": None if steps is None else steps * 0.1,
              "epochs_to_target": None if steps is None else steps / (50_000 // batch), "steps": 10 * (50_000 // batch),
              "noise_scale_B_simple": -7.0 * b_simple,  # the final estimate: late-training noise, even negative
              "noise_scale_B_simple_at_target": None if steps is None else b_simple}  # fmt: skip
    return {"run_id": f"{opt}_b{batch}_lr{mult:g}_w{world}", "optimizer": opt,
            "optimizer_label": OPTIMIZERS[opt].label, "batch": batch, "lr_mult": mult, "world": world, "micro": micro,
            "gas": gas, "lr": 0.1 * mult, "status": "ok", "wall_s": 10.0, "result": result}  # fmt: skip


def _synthetic() -> list[dict[str, Any]]:
    """SP-NGD follows S = S_min (1 + B_noise / B) exactly and keeps its accuracy up to 16384; each first-order method
    keeps it only up to 1024 and needs 3x SP-NGD's steps. The LR multiplier 1 is the good one (0.5 is worse)."""
    recs = []
    for b in BATCHES:
        sp_steps = S_MIN * (1 + B_NOISE / b)
        recs.append(_record("spngd", b, 1.0, 0.900 - 0.001 * BATCHES.index(b), sp_steps))
        recs.append(_record("spngd", b, 0.5, 0.880, None))
        for k, opt in enumerate(("sgd", "lars", "lamb")):
            acc = 0.895 - 0.001 * k if b <= 1024 else 0.870
            recs.append(_record(opt, b, 1.0, acc, 3 * sp_steps))
            recs.append(_record(opt, b, 0.5, acc - 0.01, 4 * sp_steps))
    recs.append({**_record("sgd", 16384, 2.0, 0.0, None), "status": "failed", "result": None})
    return recs


def test_noise_scale_prediction_matches_a_hand_calculation() -> None:
    assert report.predicted_steps(100.0, 1000.0, 256) == pytest.approx(100 * (1 + 1000 / 256))  # 490.625
    assert report.predicted_steps(100.0, 1000.0, 256) == pytest.approx(490.625)
    steps = [S_MIN * (1 + B_NOISE / b) for b in BATCHES]
    assert report.fit_s_min(BATCHES, steps, B_NOISE) == pytest.approx(S_MIN)
    s_min, b_noise = report.fit_b_noise(BATCHES, steps) or (0.0, 0.0)
    assert (s_min, b_noise) == (pytest.approx(S_MIN), pytest.approx(B_NOISE))
    # two points, off the curve by factors 2 and 1/2 at B_noise = 0: S_min is their geometric mean
    assert report.fit_s_min([100, 200], [20.0, 5.0], 0.0) == pytest.approx(10.0)
    assert report.fit_b_noise([256, 256], [1.0, 2.0]) is None


def test_measured_noise_scale_prefers_values_at_target() -> None:
    recs = [_record("sgd", 256, 1.0, 0.9, 100, b_simple=1000.0), _record("lars", 256, 1.0, 0.9, 100, b_simple=3000.0),
            _record("lamb", 256, 1.0, 0.9, 100, b_simple=2000.0), _record("spngd", 256, 1.0, 0.8, None)]
    assert report.measured_noise_scale(recs) == 2000.0  # median of the at-target values; the failed-to-reach run out
    for r, final in zip(recs, (-5.0, 600.0, 200.0, 400.0), strict=True):
        r["result"]["noise_scale_B_simple_at_target"] = None
        r["result"]["noise_scale_B_simple"] = final
    assert report.measured_noise_scale(recs) == 400.0  # fallback: median of the positive final values
    assert report.measured_noise_scale([]) is None


def test_retarget_recomputes_steps_from_the_evaluations() -> None:
    rec = _record("sgd", 1024, 1.0, 0.90, 30)
    rec["result"].update(target_acc=0.88, steps_per_epoch=48, evals=[[12, 1.5, 0.70], [24, 3.0, 0.81], [36, 4.5, 0.89]])
    (low,) = report.retarget([rec], 0.80)
    assert (low["result"]["steps_to_target"], low["result"]["time_to_target_s"]) == (24, 3.0)
    assert low["result"]["epochs_to_target"] == 0.5 and low["result"]["noise_scale_B_simple_at_target"] is None
    (high,) = report.retarget([rec], 0.95)
    assert high["result"]["steps_to_target"] is None and high["result"]["target_acc"] == 0.95
    assert report.retarget([rec], 0.88)[0] is rec and rec["result"]["steps_to_target"] == 30  # same target: as run


def test_largest_stable_batch_is_contiguous_from_the_smallest() -> None:
    acc = {256: 0.900, 1024: 0.897, 4096: 0.894, 16384: 0.899}
    assert report.largest_stable_batch(acc) == 1024  # 4096 is 0.6 pp below: 16384 does not count
    assert report.largest_stable_batch({256: 0.9, 512: 0.8951}) == 512
    assert report.largest_stable_batch({}) is None
    # a swept batch where every LR diverged breaks the run of stable batches
    assert report.largest_stable_batch({256: 0.9, 4096: 0.9}, batches=[256, 1024, 4096]) == 256
    assert report.largest_stable_batch({1024: 0.9}, batches=[256, 1024]) is None


def test_diverged_cells_are_reported_and_fail_stability(tmp_path: Path) -> None:
    recs = [r for r in _synthetic() if not (r["optimizer"] == "lars" and r["batch"] == 1024)]
    recs += [{**_record("lars", 1024, m, 0.0, None), "status": "diverged", "result": None} for m in (0.5, 1.0)]
    a = report.aims(recs, world=2)
    assert a["stable_batch"]["lars"] == 256 and a["stable_batch"]["sgd"] == 1024
    rows = report.summary_rows(recs)
    lars_1024 = next(r for r in rows if r[:3] == ["LARS", "2", "1024"])
    assert lars_1024[3:5] == ["—", "all LRs diverged"]
    assert all(len(r) == len(report.SUMMARY_HEADER) for r in rows)
    log = tmp_path / "run.log"
    log.write_text("...\nFloatingPointError: non-finite training loss nan at optimizer step 8\n")
    assert runner.diverged(log) and not runner.diverged(tmp_path / "missing.log")


def test_report_selection_aims_table_and_figures(tmp_path: Path) -> None:
    recs = _synthetic()
    acc, steps = report.best_by_accuracy(recs), report.best_by_steps(recs)
    assert {r["lr_mult"] for by_b in acc.values() for r in by_b.values()} == {1.0}
    assert steps[("spngd", 2)][256]["result"]["steps_to_target"] == round(S_MIN * (1 + B_NOISE / 256))
    assert report.measured_noise_scale(recs) == B_NOISE
    a = report.aims(recs, world=2)
    assert a["stable_batch"]["spngd"] == 16384 and a["best_first_order_stable_batch"] == 1024
    assert a["stable_ratio"] == 16 and a["aim1_met"]
    assert set(a["steps_ratio"]) == {4096, 16384}
    assert all(v == pytest.approx(1 / 3, abs=0.02) for v in a["steps_ratio"].values()) and a["aim2_met"]

    summary, figures = report.write_report(recs, tmp_path, 0.88)
    text = summary.read_text()
    assert "| SP-NGD | 2 | 16384 | 2048×4 | 0.1 (×1) | 89.70% | -0.30 |" in text
    assert "| SGD-Goyal | 2 | 16384 | 2048×4 | 0.1 (×1) | 87.00% | -2.50 |" in text
    assert "SP-NGD / best first-order = 16.00 (aim ≥ 4: met)" in text
    assert "| SGD-Goyal | 2 | 16384 | 2 | 0.2 | failed | — | — | 10 |" in text  # the failed run is listed
    assert f"S_min {S_MIN:.1f} at the measured B_noise; free fit S_min {S_MIN:.1f}, B_noise {B_NOISE:.0f}" in text
    assert [f.name for f in figures] == ["test_error_vs_batch.png", "steps_to_target_vs_batch.png",
                                         "time_to_target_vs_batch.png"]
    for f in figures:
        data = f.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 150_000, (f, len(data))
        width, height = struct.unpack(">II", data[16:24])
        assert 400 <= width <= 1000 and 300 <= height <= 800


def test_aims_missed_when_spngd_misses_the_target(tmp_path: Path) -> None:
    recs = [r for r in _synthetic() if not (r["optimizer"] == "spngd" and r["batch"] == 16384)]
    recs.append(_record("spngd", 16384, 1.0, 0.85, None))
    a = report.aims(recs, world=2)
    assert a["steps_ratio"][16384] is None and not a["aim2_met"]
    assert a["stable_batch"]["spngd"] == 4096 and a["stable_ratio"] == 4 and a["aim1_met"]


# ---- W&B offline records ----------------------------------------------------------------------------------------
def _wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a W&B transaction log (``run-<id>.wandb``: a 7-byte ``:W&B`` header, then LevelDB-style
    32 KiB blocks of chunks ``crc32 | length (2) | type (1) | data``; types 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def _wandb_summary(run_dir: Path) -> dict[str, Any]:
    (log,) = run_dir.glob("run-*.wandb")
    kinds: dict[str, int] = {}
    history: set[str] = set()
    name = group = ""
    config: set[str] = set()
    for rec in _wandb_records(log):
        kind = rec.WhichOneof("record_type")
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind == "history":
            history.update(item.key or "/".join(item.nested_key) for item in rec.history.item)
        elif kind == "run":
            name, group = rec.run.display_name, rec.run.run_group
        elif kind == "config":
            config.update(item.key for item in rec.config.update)
    return {"kinds": kinds, "history": history, "name": name, "group": group, "config": config}


def test_summary_run_logs_figures_offline(tmp_path: Path) -> None:
    recs = _synthetic()
    _, figures = report.write_report(recs, tmp_path, 0.88)
    folder = report.log_to_wandb(recs, figures, tmp_path, "proj", "grp", "offline", config={"k": 1})
    assert folder is not None
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    info = _wandb_summary(run_dir)
    assert info["name"] == "grp-summary" and info["group"] == "grp" and info["kinds"].get("exit") == 1
    assert {f"figures/{f.stem}/_type" for f in figures} <= info["history"]
    assert "summary_table/_type" in info["history"] and "lr_grid/_type" in info["history"]
    assert len(list(run_dir.glob("files/media/images/figures/*.png"))) == 3
    assert report.log_to_wandb(recs, figures, tmp_path, "proj", "grp", "disabled") is None


# ---- end to end ---------------------------------------------------------------------------------------------------
def _dataset() -> str:
    from ds_spngd_lab.data.fashion_mnist import find_fashion_mnist_dir

    try:
        find_fashion_mnist_dir()
        return "fashion-mnist"
    except FileNotFoundError:
        return "mnist"


@pytest.mark.launcher
def test_tiny_sweep_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two 3-step runs (SGD-Goyal, SP-NGD) on 2 CPU ranks through the deepspeed launcher, W&B offline."""
    from ds_spngd_lab.sweep.cli import main

    out = tmp_path / "sweep"
    rc = main(["--name", "e2e", "--out", str(out), "--optimizers", "sgd", "spngd", "--batches", "256",
               "--lr-mults", "1", "--epochs", "1", "--max-steps", "3", "--model", "mlp", "--dataset", _dataset(),
               "--wandb-mode", "offline", "--timeout", "300"])  # fmt: skip
    printed = capsys.readouterr().out
    records = json.loads((out / "results.json").read_text())
    logs = "\n".join(Path(r["log"]).read_text(errors="replace")[-3000:] for r in records)
    assert rc == 0 and [r["status"] for r in records] == ["ok", "ok"], logs
    progress = [line for line in printed.splitlines() if line.startswith(("[1/2]", "[2/2]"))]
    assert [line[:15] for line in progress] == ["[1/2] SGD-Goyal", "[2/2] SP-NGD   "]  # one line per finished run
    for r in records:
        res = json.loads((out / "runs" / r["run_id"] / "result.json").read_text())
        assert res["steps"] == 3 and res["world_size"] == 2 and res["global_batch"] == 256
        assert math.isfinite(res["noise_scale_B_simple"])
        assert "noise_scale_B_simple_at_target" not in res  # 3 steps: the target was not reached
        assert r["shm_removed"] == 2 and shm_buffers(r["port"]) == []  # its own 2 ranks' buffers, deleted
        cfg = json.loads((out / "configs" / f"{r['run_id']}.json").read_text())
        assert cfg["wandb"]["group"] == "e2e"
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 3  # two training runs and the summary run
    by_name = {info["name"]: info for info in map(_wandb_summary, runs)}
    assert set(by_name) == {"e2e-sgd_b256_lr1_w2", "e2e-spngd_b256_lr1_w2", "e2e-summary"}
    for name in ("e2e-sgd_b256_lr1_w2", "e2e-spngd_b256_lr1_w2"):
        info = by_name[name]
        assert info["group"] == "e2e" and info["kinds"].get("exit") == 1  # finished: flushed for wandb sync
        assert {"Train/loss", "Train/lr", "Test/top1", "Train/noise_scale_B_simple"} <= info["history"]
        assert {"ds_config", "global_batch", "optimizer"} <= info["config"]
    assert {"SPNGD/optimizer_s", "SPNGD/factor_bytes"} <= by_name["e2e-spngd_b256_lr1_w2"]["history"]
    assert (out / "summary.md").exists() and len(list(out.glob("*.png"))) == 3
    assert f"wandb sync {out}/wandb/offline-run-*" in printed


def test_resume_extends_a_sweep_without_relaunching(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_sweep with a fake launcher: ok and diverged runs are not launched again on resume, and records of earlier
    invocations outside the new grid are kept."""
    launched: list[str] = []

    def fake_launch(cmd: list[str], env: dict[str, str], log_path: Path, port: int, timeout_s: float,
                    stream: bool = False) -> tuple[str, int, float]:
        out = Path(cmd[cmd.index("--out-dir") + 1])
        launched.append(out.name)
        assert env["WANDB_MODE"] == "offline" and env["WANDB_NAME"] == f"s-{out.name}"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if "_lr2_" in out.name:
            log_path.write_text("FloatingPointError: non-finite training loss nan\n")
            return "failed", 2, 0.1
        out.mkdir(parents=True)
        (out / "result.json").write_text(json.dumps({"test_top1": 0.9, "steps_to_target": 5, "time_to_target_s": 1.0}))
        return "ok", 2, 0.1

    monkeypatch.setattr(runner, "launch_run", fake_launch)
    monkeypatch.setenv("WANDB_MODE", "offline")
    base: dict[str, Any] = {"name": "s", "out_dir": tmp_path, "optimizers": ("sgd",), "batches": (256,),
                            "lr_mults": (1.0, 2.0)}
    lines: list[str] = []
    first = runner.run_sweep(runner.SweepSettings(**base), lines.append)
    assert [o.status for o in first] == ["ok", "diverged"] and launched == ["sgd_b256_lr1_w2", "sgd_b256_lr2_w2"]
    assert sum(line.startswith("[") for line in lines) == 2
    more = runner.SweepSettings(**{**base, "batches": (256, 1024), "lr_mults": (1.0,), "resume": True})
    runner.run_sweep(more, lines.append)
    assert launched[2:] == ["sgd_b1024_lr1_w2"]  # 256 x1 reused; 256 x2 (diverged) kept, not in this grid
    ids = [r["run_id"] for r in json.loads((tmp_path / "results.json").read_text())]
    assert ids == ["sgd_b256_lr1_w2", "sgd_b256_lr2_w2", "sgd_b1024_lr1_w2"]
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 3  # one line per launch
