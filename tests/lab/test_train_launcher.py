"""End-to-end: ``deepspeed --num_gpus 2 train.py`` for each shipped optimizer config (slow; marker ``launcher``).

Each launch costs ~20-40 s on a 2-core CPU machine (the first one also JIT-builds DeepSpeed's shm comm op).
Run with ``pytest -m launcher``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.support.harness import ROOT, load_script, remove_shm_buffers, run_procs


def _deepspeed() -> str:
    found = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    if not Path(found).exists():
        pytest.skip("the deepspeed launcher is not installed")
    return found


def _launch(cmd: list[str], port: int, tmp_path: Path, timeout: float = 600.0) -> str:
    """Run the deepspeed launcher with a hard timeout (its whole process group, ranks included, is killed on expiry:
    a hung rank cannot hang the test) and remove the run's /dev/shm buffers; returns its output."""
    try:
        (res,) = run_procs([cmd], [dict(os.environ)], timeout, tmp_path / "launcher_logs", cwd=ROOT)
    finally:
        remove_shm_buffers(port)
    assert res.returncode == 0, f"launcher {res.status()}:\n{res.tail(8000)}"
    return res.log


@pytest.mark.launcher
@pytest.mark.parametrize("name", ["sgd", "lars", "lamb", "spngd", "spngd_bf16", "spngd_zero2_bf16"])
def test_train_three_steps_on_two_ranks(name: str, tmp_path: Path) -> None:
    config = ROOT / "ds_configs" / f"{name}.json"
    if not config.exists():
        pytest.fail(f"{config} is missing")
    out = tmp_path / name
    port = 29500 + (os.getpid() % 400)
    cmd = [_deepspeed(), "--num_gpus", "2", "--master_port", str(port), "train.py",
           "--deepspeed_config", str(config), "--max-steps", "3", "--model", "cnn", "--global-batch", "256",
           "--out-dir", str(out)]  # fmt: skip
    _launch(cmd, port, tmp_path)
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 3 and result["world_size"] == 2 and result["global_batch"] == 256
    assert result["final_loss"] is not None and math.isfinite(result["final_loss"])
    assert 0.0 <= result["test_top1"] <= 1.0
    rows = (out / "steps.csv").read_text().splitlines()
    assert rows[0] == "step,samples,loss,lr,wall_time_s" and len(rows) == 4
    assert rows[-1].startswith("3,768,")


def test_engine_timings_reach_deepspeeds_monitor(tmp_path: Path) -> None:
    """ZeRO-2 + bf16 through train.py with DeepSpeed's csv_monitor: SP-NGD's per-step timings and bytes arrive."""
    cfg = json.loads((ROOT / "ds_configs" / "spngd_zero2_bf16.json").read_text())
    cfg["optimizer"]["params"].update(factor_update_steps=1, inv_update_steps=1)
    cfg["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path / "mon"), "job_name": "j"}
    cfg["log_level"] = "info"  # DeepSpeed's logger (and the SP-NGD start-up reports through it) default to WARNING
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(cfg))
    port = 29100 + (os.getpid() % 400)
    cmd = [_deepspeed(), "--num_gpus", "2", "--master_port", str(port), "train.py",
           "--deepspeed_config", str(config), "--max-steps", "3", "--model", "cnn", "--global-batch", "256",
           "--out-dir", str(tmp_path / "out")]  # fmt: skip
    log = _launch(cmd, port, tmp_path)
    mon = tmp_path / "mon" / "j"
    for name in ("forward_s", "backward_s", "factor_s", "comm_wait_s", "inversion_s", "precondition_s",
                 "factor_bytes", "factor_dense_bytes", "precondition_bytes", "skipped_steps",
                 *(f"memory_{k}_bytes" for k in ("factors", "accumulators", "preconditioners", "comm_buffers",
                                                  "momentum", "total"))):
        rows = (mon / f"SPNGD_{name}.csv").read_text().splitlines()
        assert len(rows) == 1 + 3, name  # header + one row per optimizer step
        assert all(math.isfinite(float(r.split(",")[1])) for r in rows[1:])
    ratio = [float(r.split(",")[1]) for r in (mon / "SPNGD_factor_bytes.csv").read_text().splitlines()[1:]]
    dense = [float(r.split(",")[1]) for r in (mon / "SPNGD_factor_dense_bytes.csv").read_text().splitlines()[1:]]
    assert all(0.5 < a / b <= 0.55 for a, b in zip(ratio, dense, strict=True))  # packed fp32 payload on gloo
    memory = [float(r.split(",")[1]) for r in (mon / "SPNGD_memory_total_bytes.csv").read_text().splitlines()[1:]]
    assert all(m > 0 for m in memory)  # rank 0's factors, preconditioners and momentum
    assert "SP-NGD preconditions" in log and "SP-NGD memory per rank, max over ranks" in log  # start-up reports


def _poison_second_loss(train: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make train.py's second loss NaN (as a diverging step would)."""
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def poisoned(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = real(logits, target)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(train.F, "cross_entropy", poisoned)


@pytest.mark.launcher
def test_non_finite_loss_stops_before_the_update(
    single_rank_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train = load_script()
    _poison_second_loss(train, monkeypatch)
    out = tmp_path / "nan"
    argv = ["--deepspeed_config", str(ROOT / "ds_configs" / "sgd.json"), "--model", "mlp", "--global-batch", "64",
            "--max-steps", "4", "--out-dir", str(out)]  # fmt: skip
    with pytest.raises(FloatingPointError, match="optimizer step 2 "):
        train.main(argv)
    rows = (out / "steps.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("1,64,")  # step 1 logged, step 2 never completed


@pytest.mark.launcher
def test_non_finite_loss_is_skipped_with_nonfinite_skip(
    single_rank_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With SP-NGD's "nonfinite": "skip", train.py leaves a NaN step to the optimizer, which skips it (DeepSpeed
    counts it, holds the LR scheduler) and training goes on to a finite result."""
    train = load_script()
    _poison_second_loss(train, monkeypatch)
    cfg = json.loads((ROOT / "ds_configs" / "spngd.json").read_text())
    cfg["optimizer"]["params"].update(nonfinite="skip", factor_update_steps=1, inv_update_steps=1)
    config = tmp_path / "skip.json"
    config.write_text(json.dumps(cfg))
    out = tmp_path / "skip"
    argv = ["--deepspeed_config", str(config), "--model", "mlp", "--global-batch", "64", "--max-steps", "4",
            "--out-dir", str(out)]  # fmt: skip
    result = train.main(argv)
    assert result.steps == 4 and math.isfinite(result.final_loss)
    rows = (out / "steps.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[2].split(",")[2] == "nan"  # step 2's loss was NaN, and it was skipped


def test_recalibrate_bn_uses_plain_average_of_batches() -> None:
    from ds_spngd_lab.evaluation import recalibrate_bn
    from ds_spngd_lab.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN()
    model.eval()
    batches = [torch.randn(16, 1, 28, 28) * (i + 1) + i for i in range(3)]
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    first_bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert first_bn.running_mean is not None
    first_bn.running_mean.fill_(123.0)
    recalibrate_bn(model, batches)
    with torch.no_grad():
        expected = torch.stack([conv(x).mean(dim=(0, 2, 3)) for x in batches]).mean(0)
    assert first_bn.running_mean is not None and torch.allclose(first_bn.running_mean, expected, atol=1e-5)
    assert first_bn.momentum == 0.1 and not model.training  # settings restored
    weights = [p.clone() for p in model.parameters()]
    recalibrate_bn(model, [])
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


def test_check_buffer_dtypes_names_the_fix() -> None:
    train = load_script()
    from ds_spngd_lab.models import SmallCNN

    model = SmallCNN()
    train.check_buffer_dtypes(model, torch.float32)
    for p in model.parameters():  # what DeepSpeed 0.19.8 does for bf16: parameters only
        p.data = p.data.to(torch.bfloat16)
    with pytest.raises(ValueError, match='running_mean is torch.float32 .*"buffer_dtype": "bf16"'):
        train.check_buffer_dtypes(model, torch.bfloat16)
    train.check_buffer_dtypes(model.to(torch.bfloat16), torch.bfloat16)
