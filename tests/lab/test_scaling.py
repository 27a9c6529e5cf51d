"""Tests for ds_spngd_lab.schedules.scaling: LR rules, batch-size resolution, "auto" scheduler fields, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from ds_spngd_lab.schedules.scaling import BatchScaling, batch_layout, resolve_config

CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"


def _config(rule: str = "linear", warmup: float = 2.0) -> dict[str, Any]:
    return {
        "train_batch_size": 256,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "SGD", "params": {"lr": 123.0, "momentum": 0.9}},
        "batch_scaling": {"base_lr": 0.1, "base_batch_size": 256, "rule": rule, "warmup_epochs": warmup},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto",
                       "total_num_steps": "auto", "warmup_type": "linear"},
        },
    }  # fmt: skip


def test_linear_rule_goyal() -> None:
    s = BatchScaling(base_lr=0.1, base_batch_size=256, rule="linear", warmup_epochs=5)
    assert s.lr(8192) == pytest.approx(3.2)  # Goyal et al.: 0.1 * 8k / 256
    assert s.lr(128) == pytest.approx(0.05)
    assert s.warmup(8192) == 5


def test_sqrt_rule_legw() -> None:
    s = BatchScaling(base_lr=0.1, base_batch_size=256, rule="sqrt", warmup_epochs=0.5)
    assert s.lr(1024) == pytest.approx(0.2)
    assert s.lr(256 * 9) == pytest.approx(0.3)
    assert s.warmup(1024) == pytest.approx(2.0)  # LEGW: warm-up epochs grow linearly with the batch


def test_none_rule_keeps_base() -> None:
    s = BatchScaling(base_lr=0.3, base_batch_size=256, rule="none", warmup_epochs=1)
    assert s.lr(4096) == 0.3 and s.warmup(4096) == 1


@pytest.mark.parametrize(
    "section",
    [
        {"base_lr": 0, "base_batch_size": 256},
        {"base_lr": 0.1, "base_batch_size": 0},
        {"base_lr": 0.1, "base_batch_size": 256, "rule": "cubic"},
        {"base_lr": 0.1, "base_batch_size": 256, "warmup_epochs": -1},
        {"base_lr": 0.1, "base_batch_size": 256, "typo": 1},
    ],
)
def test_schema_rejects_bad_sections(section: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        BatchScaling.model_validate(section)


def test_resolve_linear_fills_everything() -> None:
    raw = _config("linear", warmup=2.0)
    out = resolve_config(raw, global_batch=1024, steps_per_epoch=48, epochs=5, world_size=2)
    assert out["train_batch_size"] == 1024 and out["train_micro_batch_size_per_gpu"] == 512
    assert out["gradient_accumulation_steps"] == 1
    assert out["optimizer"]["params"]["lr"] == pytest.approx(0.4)
    p = out["scheduler"]["params"]
    assert p["total_num_steps"] == 240 and p["warmup_num_steps"] == 96
    assert p["warmup_max_lr"] == pytest.approx(0.4) and p["warmup_min_lr"] == 0.0
    assert p["warmup_type"] == "linear"
    assert out["batch_scaling"] == raw["batch_scaling"]  # kept; DeepSpeed ignores unknown top-level keys
    assert raw["optimizer"]["params"]["lr"] == 123.0 and raw["scheduler"]["params"]["total_num_steps"] == "auto"


def test_resolve_sqrt_with_accumulation() -> None:
    raw = _config("sqrt", warmup=0.5)
    raw["gradient_accumulation_steps"] = 2
    out = resolve_config(raw, global_batch=4096, steps_per_epoch=12, epochs=2.5, world_size=4)
    assert out["train_micro_batch_size_per_gpu"] == 512 and out["gradient_accumulation_steps"] == 2
    assert out["optimizer"]["params"]["lr"] == pytest.approx(0.4)
    p = out["scheduler"]["params"]
    assert p["warmup_num_steps"] == round(0.5 * 16 * 12) and p["total_num_steps"] == 30


def test_resolve_without_override_keeps_config_batch_and_total_iters() -> None:
    raw = {"train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 2,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
           "scheduler": {"type": "LambdaLR", "params": {"total_iters": "auto"}}}  # fmt: skip
    out = resolve_config(raw, None, steps_per_epoch=10, epochs=1.25, world_size=3)
    assert out["train_batch_size"] == 192 and out["optimizer"]["params"]["lr"] == 1e-3
    assert out["scheduler"]["params"]["total_iters"] == math.ceil(12.5)


def test_resolve_errors() -> None:
    with pytest.raises(ValueError, match="not divisible by gradient_accumulation_steps 1 x world size 3"):
        resolve_config(_config(), 1024, 48, 5, world_size=3)
    no_section = _config()
    del no_section["batch_scaling"]
    with pytest.raises(ValueError, match="warmup_num_steps='auto' needs a 'batch_scaling' section"):
        resolve_config(no_section, None, 10, 1)
    no_opt = _config()
    del no_opt["optimizer"]
    with pytest.raises(ValueError, match="needs an 'optimizer' section"):
        resolve_config(no_opt, None, 10, 1)
    unknown = _config()
    unknown["scheduler"]["params"]["cos_min_ratio"] = "auto"
    with pytest.raises(ValueError, match="cos_min_ratio='auto' cannot be resolved"):
        resolve_config(unknown, None, 10, 1)
    bad = _config()
    bad["batch_scaling"]["rule"] = "cubic"
    with pytest.raises(ValidationError):
        resolve_config(bad, None, 10, 1)
    with pytest.raises(ValueError, match="steps_per_epoch must be positive"):
        resolve_config(_config(), None, 0, 1)


def test_batch_layout_consistency_checks() -> None:
    assert batch_layout({"train_batch_size": 64}, 2) == (64, 32, 1)
    assert batch_layout({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8}, 2) == (64, 8, 4)
    with pytest.raises(ValueError, match="!= train_micro_batch_size_per_gpu"):
        batch_layout({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2}, 2)
    with pytest.raises(ValueError, match="needs train_batch_size or"):
        batch_layout({}, 1)
    with pytest.raises(ValueError, match="positive integer"):
        batch_layout({"train_batch_size": "64"}, 1)


@pytest.mark.parametrize("name", ["sgd", "lars", "lamb"])
def test_shipped_configs_resolve_and_pass_deepspeed_validation(name: str) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads((CONFIGS / f"{name}.json").read_text())
    assert raw["gradient_clipping"] == 0 and raw["zero_optimization"] == {"stage": 0}
    out = resolve_config(raw, 1024, 48, 5, world_size=1)  # DeepSpeedConfig sees world 1 without torch.distributed

    def has_auto(obj: Any) -> bool:
        if isinstance(obj, dict):
            return any(has_auto(v) for v in obj.values())
        return obj == "auto"

    assert not has_auto(out)
    ds = DeepSpeedConfig(out)  # DeepSpeed's own schema (extra="forbid" in its sections)
    assert ds.train_batch_size == 1024 and ds.gradient_clipping == 0
    assert ds.scheduler_name == raw["scheduler"]["type"]
