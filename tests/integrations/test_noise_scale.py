"""Gradient noise scale B_simple (ds_spngd.integrations.deepspeed.noise_scale; McCandlish et al. 2018, App. A.1)."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import deepspeed
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ds_spngd
from ds_spngd.config import SPNGDConfigError
from ds_spngd.integrations.deepspeed.noise_scale import NoiseScaleEstimator, noise_scale_stats, parse_noise_scale
from tests.support.harness import remove_shm_buffers, run_procs

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- estimator


def test_one_step_matches_hand_computation() -> None:
    est = NoiseScaleEstimator(b=2, big_b=8, ema=0.5)
    est.update(torch.tensor(5.0), torch.tensor(3.0))
    g2 = (8 * 3.0 - 2 * 5.0) / (8 - 2)  # Eq. A.2: 14/6
    s = (5.0 - 3.0) / (1 / 2 - 1 / 8)  # Eq. A.3: 16/3
    stats = est.stats()
    assert stats["grad_sq_norm_true"] == pytest.approx(g2) and stats["grad_noise_trace"] == pytest.approx(s)
    assert stats["B_simple"] == pytest.approx(s / g2) and stats["B_simple_raw"] == pytest.approx(s / g2)
    # second step: bias-corrected EMA = (0.5·x1 + x2) / 1.5 ·... written out
    est.update(6.0, 2.0)
    g2b, sb = (8 * 2.0 - 2 * 6.0) / 6, (6.0 - 2.0) / (1 / 2 - 1 / 8)
    ema_g2 = (0.5 * 0.5 * g2 + 0.5 * g2b) / (1 - 0.5**2)
    ema_s = (0.5 * 0.5 * s + 0.5 * sb) / (1 - 0.5**2)
    stats = est.stats()
    assert stats["grad_sq_norm_true"] == pytest.approx(ema_g2) and stats["grad_noise_trace"] == pytest.approx(ema_s)
    assert stats["B_simple"] == pytest.approx(ema_s / ema_g2)
    assert stats["grad_sq_norm_true_raw"] == pytest.approx(g2b) and stats["B_simple_raw"] == pytest.approx(sb / g2b)


def test_estimator_rejects_undefined_batches() -> None:
    assert NoiseScaleEstimator(4, 8).stats() == {}
    with pytest.raises(ValueError, match="b < B"):
        NoiseScaleEstimator(8, 8)  # one rank: B_simple undefined


def test_ema_b_simple_converges_to_trace_over_mean_norm() -> None:
    """Per-example gradients ~ N(μ, Σ): per-rank means of b examples and their global mean over `ranks`; the
    EMA'd B_simple must approach tr(Σ)/|μ|² (and the EMAs |μ|², tr(Σ))."""
    gen = torch.Generator().manual_seed(0)
    d, ranks, b, steps = 12, 4, 8, 3000
    mu = torch.randn(d, generator=gen, dtype=torch.float64)
    factor = torch.randn(d, d, generator=gen, dtype=torch.float64) * 0.6
    sigma = factor @ factor.T
    trace, mu_sq = float(torch.trace(sigma)), float(mu.square().sum())
    examples = mu + torch.randn(steps, ranks, b, d, generator=gen, dtype=torch.float64) @ factor.T
    rank_means = examples.mean(dim=2)  # (steps, ranks, d): G_b of each rank
    global_mean = rank_means.mean(dim=1)  # (steps, d): G_B
    small = rank_means.square().sum(-1).mean(-1)  # mean over ranks of |G_b|²
    big = global_mean.square().sum(-1)
    est = NoiseScaleEstimator(b, b * ranks, ema=0.998)
    for t in range(steps):
        est.update(small[t], big[t])
    stats = est.stats()
    assert trace / mu_sq > 1.0  # a regime where the noise matters
    assert stats["grad_sq_norm_true"] == pytest.approx(mu_sq, rel=0.1)
    assert stats["grad_noise_trace"] == pytest.approx(trace, rel=0.1)
    assert stats["B_simple"] == pytest.approx(trace / mu_sq, rel=0.15)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("section", "key"),
    [({"ema": 1.0}, "gradient_noise_scale.ema"), ({"ema": True}, "gradient_noise_scale.ema"),
     ({"enabled": "yes"}, "gradient_noise_scale.enabled"), ({"decay": 0.9}, "gradient_noise_scale.decay")],
)  # fmt: skip
def test_bad_section_names_the_key(section: dict[str, Any], key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SPNGDConfigError) as err:
        parse_noise_scale({"gradient_noise_scale": section})
    assert key in str(err.value)

    def fail(*args: Any, **kwargs: Any) -> Any:
        pytest.fail("deepspeed.initialize was called although the config is invalid")

    monkeypatch.setattr(deepspeed, "initialize", fail)
    cfg = {"train_batch_size": 8, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "gradient_noise_scale": section}
    with pytest.raises(SPNGDConfigError, match=key.replace(".", r"\.")):
        ds_spngd.initialize(model=nn.Linear(2, 2), config=cfg)


def test_defaults() -> None:
    cfg = parse_noise_scale({})
    assert not cfg.enabled and cfg.ema == 0.95
    assert parse_noise_scale({"gradient_noise_scale": {"enabled": True}}).enabled


# ---------------------------------------------------------------- engines


def test_one_rank_engine_reports_nothing(single_rank_env: None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    cfg = {"train_batch_size": 8, "gradient_clipping": 0, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
           "gradient_noise_scale": {"enabled": True, "ema": 0.9}}  # fmt: skip
    engine, _, _, _ = ds_spngd.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    assert engine.noise_scale_estimator is None  # b = B: undefined
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    engine.backward(F.cross_entropy(engine(x), y))
    engine.step()
    assert noise_scale_stats(engine) == {}


def _deepspeed() -> str:
    found = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    if not Path(found).exists():
        pytest.skip("the deepspeed launcher is not installed")
    return found


@pytest.mark.launcher
def test_two_ranks_train_reports_finite_b_simple(tmp_path: Path) -> None:
    """``deepspeed --num_gpus 2 train.py`` with sgd.json + the section (gradient accumulation 2, csv monitor):
    result.json carries a finite B_simple and the monitor wrote the three series every step."""
    cfg = json.loads((ROOT / "ds_configs" / "sgd.json").read_text())
    cfg.update({"gradient_accumulation_steps": 2, "gradient_noise_scale": {"enabled": True, "ema": 0.9},
                "csv_monitor": {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "gns"}})  # fmt: skip
    config = tmp_path / "sgd_gns.json"
    config.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    port = 29500 + (os.getpid() % 400)
    cmd = [_deepspeed(), "--num_gpus", "2", "--master_port", str(port), "train.py", "--deepspeed_config",
           str(config), "--max-steps", "3", "--model", "cnn", "--global-batch", "256",
           "--out-dir", str(out)]  # fmt: skip
    try:
        (res,) = run_procs([cmd], [dict(os.environ)], 600.0, tmp_path / "launcher_logs", cwd=ROOT)
    finally:
        remove_shm_buffers(port)
    assert res.returncode == 0, f"launcher {res.status()}:\n{res.tail(8000)}"
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 3 and result["world_size"] == 2
    assert math.isfinite(result["noise_scale_B_simple"])
    for name in ("noise_scale_B_simple", "grad_sq_norm_true", "grad_noise_trace"):
        files = list((tmp_path / "csv").rglob(f"*{name}*"))
        assert files, f"no monitor file for Train/{name}"
        assert len(files[0].read_text().strip().splitlines()) == 1 + 3  # header + one row per optimizer step
