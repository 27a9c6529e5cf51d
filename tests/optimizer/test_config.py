"""The SP-NGD JSON contract: ``parse_spngd_params`` and the validation done by ``ds_spngd.initialize``.

Every invalid config must be rejected with :class:`SPNGDConfigError` naming the offending key, and ``initialize``
must reject it before DeepSpeed builds anything (``deepspeed.initialize`` is monkeypatched to fail the test).
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace
from typing import Any

import deepspeed
import pytest
import torch
from torch import nn

import ds_spngd
from ds_spngd.config import SPNGDConfig, SPNGDConfigError, parse_spngd_params

DEFAULTS = {
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "damping": 1e-3,
    "fisher_type": "emp",
    "inverse_method": "inverse",
    "factor_decay": 0.95,
    "factor_sample_fraction": 1.0,
    "factor_update_steps": 1,
    "inv_update_steps": 1,
    "kl_clip": None,
    "weight_rescale": False,
    "momentum_correction": True,
    "loss_reduction": "mean",
    "skip_modules": (),
    "precondition_mode": "comm_opt",
    "comm_dtype": "auto",
    "bucket_cap_mb": 4.0,
    "overlap_comm": True,
    "nonfinite": "raise",
    "max_consecutive_skips": 10,
    "kfac_approx": "expand",
    "factor_dtype": "auto",
    "max_factor_dim": 4096,
    "large_dim_method": "block",
    "memory_check": True,
    "stale_statistics": False,
    "stale_tolerance": 0.05,
    "stale_max_interval": 8,
    "direction": "natural",
    "polar_momentum": 0.95,
    "polar_nesterov": True,
    "polar_steps": 5,
    "min_preconditioned_fraction": 0.5,
    "async_inverse": False,
    "async_inverse_delay": None,
}

# a valid non-default value for every public key
VALID = {
    "lr": 0.25,
    "momentum": 0.5,
    "weight_decay": 5e-5,
    "damping": 2.5e-2,
    "fisher_type": "mc",
    "inverse_method": "eigen",
    "factor_decay": 0.0,
    "factor_sample_fraction": 0.25,
    "factor_update_steps": 3,
    "inv_update_steps": 6,
    "kl_clip": 1e-3,
    "weight_rescale": True,
    "momentum_correction": False,
    "loss_reduction": "sum",
    "skip_modules": ["fc1", "block.conv"],
    "precondition_mode": "mem_opt",
    "comm_dtype": "bf16",
    "bucket_cap_mb": 0.5,
    "overlap_comm": False,
    "nonfinite": "skip",
    "max_consecutive_skips": 3,
    "kfac_approx": "reduce",
    "factor_dtype": "bf16",
    "max_factor_dim": 1024,
    "large_dim_method": "diagonal",
    "memory_check": False,
    "stale_statistics": True,
    "stale_tolerance": 0.2,
    "stale_max_interval": 4,
    "direction": "polar",
    "polar_momentum": 0.9,
    "polar_nesterov": False,
    "polar_steps": 3,
    "min_preconditioned_fraction": 0.1,
    "async_inverse": True,
    "async_inverse_delay": 1,
}

# (key, value of a wrong type)
WRONG_TYPE = [
    ("lr", "fast"),
    ("lr", [0.1]),
    ("momentum", "heavy"),
    ("weight_decay", {"l2": 1}),
    ("damping", "small"),
    ("fisher_type", 3),
    ("inverse_method", 1),
    ("factor_decay", "x"),
    ("factor_sample_fraction", "half"),
    ("factor_update_steps", 1.5),
    ("factor_update_steps", "two"),
    ("inv_update_steps", 2.5),
    ("kl_clip", "tight"),
    ("weight_rescale", "maybe"),
    ("weight_rescale", [True]),
    ("momentum_correction", "sometimes"),
    ("loss_reduction", 0),
    ("skip_modules", 5),
    ("skip_modules", "fc1"),
    ("skip_modules", [1]),
    ("precondition_mode", 1),
    ("comm_dtype", 16),
    ("bucket_cap_mb", "big"),
    ("bucket_cap_mb", True),
    ("overlap_comm", "yes please"),
    ("nonfinite", 1),
    ("max_consecutive_skips", "ten"),
    ("max_consecutive_skips", True),
    ("max_consecutive_skips", 2.5),
    ("kfac_approx", 1),
    ("max_factor_dim", "big"),
    ("max_factor_dim", True),
    ("max_factor_dim", 2.5),
    ("large_dim_method", 0),
    ("factor_dtype", 16),
    ("memory_check", "maybe"),
    ("stale_statistics", "often"),
    ("stale_tolerance", "loose"),
    ("stale_tolerance", True),
    ("stale_max_interval", 2.5),
    ("stale_max_interval", True),
    ("direction", 1),
    ("polar_momentum", "high"),
    ("polar_momentum", True),
    ("polar_nesterov", "yes please"),
    ("polar_steps", 2.5),
    ("polar_steps", True),
    ("min_preconditioned_fraction", "half"),
    ("min_preconditioned_fraction", True),
    ("async_inverse", "sometimes"),
    ("async_inverse_delay", 1.5),
    ("async_inverse_delay", True),
]

# (key, out-of-range value); booleans have no range: 2 is "neither true nor false"
OUT_OF_RANGE = [
    ("lr", 0.0),
    ("lr", -0.1),
    ("momentum", 1.0),
    ("momentum", -0.1),
    ("weight_decay", -1e-4),
    ("damping", 0.0),
    ("damping", -1.0),
    ("fisher_type", "kfac"),
    ("inverse_method", "cholesky"),
    ("factor_decay", 1.0),
    ("factor_decay", -0.5),
    ("factor_sample_fraction", 0.0),
    ("factor_sample_fraction", 1.5),
    ("factor_update_steps", 0),
    ("factor_update_steps", -3),
    ("inv_update_steps", 0),
    ("kl_clip", 0.0),
    ("kl_clip", -1.0),
    ("weight_rescale", 2),
    ("momentum_correction", 2),
    ("overlap_comm", 2),
    ("loss_reduction", "max"),
    ("precondition_mode", "hybrid"),
    ("comm_dtype", "fp8"),
    ("bucket_cap_mb", 0.0),
    ("bucket_cap_mb", -1.0),
    ("nonfinite", "ignore"),
    ("max_consecutive_skips", 0),
    ("kfac_approx", "sum"),
    ("max_factor_dim", 0),
    ("large_dim_method", "lowrank"),
    ("factor_dtype", "fp16"),
    ("memory_check", 2),
    ("stale_statistics", 2),
    ("stale_tolerance", -0.1),
    ("stale_max_interval", 0),
    ("direction", "orthogonal"),
    ("polar_momentum", 1.0),
    ("polar_nesterov", 2),
    ("polar_steps", 0),
    ("polar_steps", 21),
    ("min_preconditioned_fraction", -0.1),
    ("min_preconditioned_fraction", 1.5),
    ("async_inverse_delay", 0),
    ("async_inverse", 2),
]


# ---- parse_spngd_params ----------------------------------------------------------------------------------------
def test_defaults() -> None:
    for params in (None, {}):
        cfg = parse_spngd_params(params)
        assert isinstance(cfg, SPNGDConfig)
        assert cfg.model_dump() == DEFAULTS


def test_every_config_key_is_covered_here() -> None:
    """A key added to SPNGDConfig must get its default, a valid value, a wrong type and (if it has one) a range here."""
    keys = set(SPNGDConfig.model_fields)
    assert keys == set(DEFAULTS) == set(VALID)
    assert keys == {k for k, _ in WRONG_TYPE}
    assert keys - {"skip_modules"} == {k for k, _ in OUT_OF_RANGE}  # module names have no range


def test_every_public_key_accepted() -> None:
    cfg = parse_spngd_params(dict(VALID))
    dumped = cfg.model_dump()
    for key, value in VALID.items():
        expected = tuple(value) if isinstance(value, list) else value
        assert dumped[key] == expected, key


@pytest.mark.parametrize("key", sorted(VALID))
def test_each_key_alone_accepted(key: str) -> None:
    params = {key: VALID[key]}
    if key == "factor_update_steps":  # the default inv_update_steps=1 is not a multiple of 3
        params["inv_update_steps"] = VALID["inv_update_steps"]
    cfg = parse_spngd_params(params)
    expected = tuple(VALID[key]) if isinstance(VALID[key], list) else VALID[key]
    assert getattr(cfg, key) == expected


def test_config_is_frozen() -> None:
    cfg = parse_spngd_params({})
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises its own ValidationError type
        cfg.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(("key", "value"), WRONG_TYPE, ids=[f"{k}={v!r}" for k, v in WRONG_TYPE])
def test_wrong_type_names_key(key: str, value: Any) -> None:
    with pytest.raises(SPNGDConfigError) as err:
        parse_spngd_params({key: value})
    assert f"optimizer.params.{key}" in str(err.value)


@pytest.mark.parametrize(("key", "value"), OUT_OF_RANGE, ids=[f"{k}={v!r}" for k, v in OUT_OF_RANGE])
def test_out_of_range_names_key(key: str, value: Any) -> None:
    with pytest.raises(SPNGDConfigError) as err:
        parse_spngd_params({key: value})
    assert f"optimizer.params.{key}" in str(err.value)


@pytest.mark.parametrize("key", ["lr", "momentum", "weight_decay", "damping", "factor_decay", "factor_sample_fraction",
                                 "factor_update_steps", "inv_update_steps", "kl_clip"])
def test_json_boolean_is_not_a_number(key: str) -> None:
    """``"lr": true`` is a wrong type (a JSON boolean), not lr = 1.0."""
    with pytest.raises(SPNGDConfigError) as err:
        parse_spngd_params({key: True})
    assert f"optimizer.params.{key}" in str(err.value)


def test_boundary_values_accepted() -> None:
    cfg = parse_spngd_params({"momentum": 0.0, "weight_decay": 0.0, "factor_decay": 0.0, "lr": 1e-12,
                              "damping": 1e-12, "kl_clip": 1e-12, "factor_update_steps": 1, "inv_update_steps": 1})
    assert cfg.momentum == 0.0 and cfg.factor_decay == 0.0 and cfg.kl_clip == 1e-12


def test_unknown_key_named() -> None:
    with pytest.raises(SPNGDConfigError) as err:
        parse_spngd_params({"lr": 0.1, "dampening": 0.1})
    assert "optimizer.params.dampening: unknown key; did you mean 'damping'?" in str(err.value)


def test_several_bad_keys_all_named() -> None:
    bad = {"lr": -1.0, "momentum": "x", "damping": 0.0, "fisher_type": "kfac", "kl_clip": -2.0, "mystery": 1,
           "skip_modules": 3, "factor_decay": 1.5}
    with pytest.raises(SPNGDConfigError) as err:
        parse_spngd_params(bad)
    msg = str(err.value)
    for key in bad:
        assert f"optimizer.params.{key}" in msg, (key, msg)
    assert "optimizer.params.weight_decay" not in msg  # valid (default) keys are not blamed


def test_custom_prefix() -> None:
    with pytest.raises(SPNGDConfigError) as err:
        parse_spngd_params({"lr": 0.0}, prefix="cfg.opt")
    assert "cfg.opt.lr" in str(err.value)


@pytest.mark.parametrize("params", [[("lr", 0.1)], "lr=0.1", 3])
def test_params_must_be_an_object(params: Any) -> None:
    with pytest.raises(SPNGDConfigError) as err:
        parse_spngd_params(params)
    assert "optimizer.params" in str(err.value)


@pytest.mark.parametrize(("fus", "ius"), [(2, 3), (3, 4), (4, 2), (2, 1)])
def test_inv_steps_must_be_multiple_of_factor_steps(fus: int, ius: int) -> None:
    with pytest.raises(SPNGDConfigError) as err:
        parse_spngd_params({"factor_update_steps": fus, "inv_update_steps": ius})
    msg = str(err.value)
    assert "inv_update_steps" in msg and "factor_update_steps" in msg
    assert "optimizer.params" in msg


@pytest.mark.parametrize(("fus", "ius"), [(1, 1), (1, 7), (2, 2), (2, 6), (5, 10)])
def test_inv_steps_multiple_accepted(fus: int, ius: int) -> None:
    cfg = parse_spngd_params({"factor_update_steps": fus, "inv_update_steps": ius})
    assert (cfg.factor_update_steps, cfg.inv_update_steps) == (fus, ius)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(SPNGDConfigError, ValueError)


# ---- ds_spngd.initialize ---------------------------------------------------------------------------------------
def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _ds_config(**optimizer_params: Any) -> dict[str, Any]:
    return {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 8,
        "optimizer": {"type": "SPNGD", "params": dict(optimizer_params)},
    }


def _forbid_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        pytest.fail("deepspeed.initialize was called although the config is invalid")

    monkeypatch.setattr(deepspeed, "initialize", fail)


def _has_hooks(model: nn.Module) -> bool:
    return any(m._forward_hooks for m in model.modules())


class _Recorder:
    """Stand-in for deepspeed.initialize: records its kwargs, steps a client SP-NGD once with zero gradients as
    DeepSpeed's fp16/bf16 wrappers do while being built, and returns a minimal engine."""

    def __init__(self, gas: int = 1) -> None:
        self.calls: list[dict[str, Any]] = []
        self.gas = gas
        self.step_ran_during_call: bool | None = None

    def __call__(self, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
        self.calls.append(kwargs)
        opt = kwargs.get("optimizer")
        if isinstance(opt, ds_spngd.SPNGD):
            self.step_ran_during_call = self._construction_step(opt)
        engine = SimpleNamespace(module=kwargs.get("model"), gradient_accumulation_steps=lambda: self.gas,
                                 data_parallel_group=None, backward=None, step=None,
                                 save_checkpoint=None, load_checkpoint=None,
                                 register_forward_pre_hook=lambda *a, **k: None,
                                 register_forward_hook=lambda *a, **k: None)
        return engine, opt, None, None

    @staticmethod
    def _construction_step(opt: ds_spngd.SPNGD) -> bool:
        """What FP16_UnfusedOptimizer.initialize_optimizer_states does: zero gradients, ``step()``, no gradients.
        True when SP-NGD's step ran (a step counted, state created or a parameter moved)."""
        params = [p for g in opt.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        for p in params:
            p.grad = None
        moved = any(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
        return opt.steps != 0 or len(opt.state) != 0 or moved


def test_initialize_rejects_bad_params_before_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_deepspeed(monkeypatch)
    model = _tiny_model()
    with pytest.raises(SPNGDConfigError) as err:
        ds_spngd.initialize(model=model, model_parameters=model.parameters(), config=_ds_config(damping=-1))
    assert "optimizer.params.damping" in str(err.value)
    assert not _has_hooks(model), "SP-NGD hooks were installed although the config was rejected"


def test_initialize_rejects_an_unknown_zero_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stages 0-3 are supported (ZeRO 3: tests/integrations/test_param_groups.py, test_distributed.py); 4 is none."""
    _forbid_deepspeed(monkeypatch)
    model = _tiny_model()
    cfg = {**_ds_config(), "zero_optimization": {"stage": 4}}
    with pytest.raises(SPNGDConfigError) as err:
        ds_spngd.initialize(model=model, config=cfg)
    assert "zero_optimization.stage=4" in str(err.value) and "0, 1, 2 or 3" in str(err.value)
    assert not _has_hooks(model)
    assert not _has_hooks(model)


@pytest.mark.parametrize("zero", [None, {"stage": 0}])
def test_initialize_rejects_stage0_fp16(monkeypatch: pytest.MonkeyPatch, zero: dict | None) -> None:
    """DeepSpeed 0.19.8's stage-0 fp16 wrapper divides the update by the loss scale without scaling the loss."""
    _forbid_deepspeed(monkeypatch)
    model = _tiny_model()
    cfg = {**_ds_config(), "fp16": {"enabled": True}}
    if zero is not None:
        cfg["zero_optimization"] = zero
    with pytest.raises(SPNGDConfigError) as err:
        ds_spngd.initialize(model=model, config=cfg)
    msg = str(err.value)
    assert "fp16" in msg and "stage 0" in msg and "bf16" in msg and "stage 1 or 2" in msg
    assert not _has_hooks(model)


def test_initialize_rejects_extra_optimizer_key(monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_deepspeed(monkeypatch)
    model = _tiny_model()
    cfg = _ds_config()
    cfg["optimizer"]["lr"] = 0.1  # belongs in params
    with pytest.raises(SPNGDConfigError) as err:
        ds_spngd.initialize(model=model, config=cfg)
    assert "optimizer.lr" in str(err.value)
    assert not _has_hooks(model)


def test_initialize_names_every_bad_key_of_the_optimizer_section(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two extra keys in ``optimizer`` and an invalid param: the one error message names all three."""
    _forbid_deepspeed(monkeypatch)
    model = _tiny_model()
    cfg = _ds_config(damping=-1)
    cfg["optimizer"]["lr"] = 0.1
    cfg["optimizer"]["betas"] = [0.9, 0.99]
    with pytest.raises(SPNGDConfigError) as err:
        ds_spngd.initialize(model=model, config=cfg)
    msg = str(err.value)
    for key in ("optimizer.lr", "optimizer.betas", "optimizer.params.damping"):
        assert key in msg, (key, msg)


def test_initialize_json_syntax_error_gives_position(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    _forbid_deepspeed(monkeypatch)
    text = '{\n  "train_batch_size": 8,\n  "optimizer": {"type": "SPNGD",, "params": {}}\n}\n'
    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads(text)
    model = _tiny_model()
    with pytest.raises(SPNGDConfigError) as err:
        ds_spngd.initialize(model=model, config=str(path))
    assert f"{path}:{ref.value.lineno}:{ref.value.colno}" in str(err.value)
    assert ref.value.lineno == 3


def test_initialize_missing_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    _forbid_deepspeed(monkeypatch)
    path = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError) as err:
        ds_spngd.initialize(model=_tiny_model(), config=str(path))
    assert str(path) in str(err.value)


def test_initialize_file_not_an_object(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    _forbid_deepspeed(monkeypatch)
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(SPNGDConfigError) as err:
        ds_spngd.initialize(model=_tiny_model(), config=str(path))
    assert str(path) in str(err.value)


def test_initialize_bad_params_in_file_via_args(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    _forbid_deepspeed(monkeypatch)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_ds_config(momentum=1.5)))
    args = argparse.Namespace(deepspeed_config=str(path), local_rank=0)
    with pytest.raises(SPNGDConfigError) as err:
        ds_spngd.initialize(args=args, model=_tiny_model())
    assert "optimizer.params.momentum" in str(err.value)


def test_initialize_passes_other_optimizers_through(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _Recorder()
    monkeypatch.setattr(deepspeed, "initialize", rec)
    model = _tiny_model()
    cfg = {"train_batch_size": 8, "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "damping": -1}},
           "zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}
    snapshot = json.dumps(cfg, sort_keys=True)
    params = list(model.parameters())
    ds_spngd.initialize(model=model, model_parameters=params, config=cfg)
    assert len(rec.calls) == 1
    kw = rec.calls[0]
    assert kw["config"] is cfg, "the config object must be handed over untouched"
    assert json.dumps(cfg, sort_keys=True) == snapshot
    assert kw["model"] is model and kw["model_parameters"] is params and kw["optimizer"] is None
    assert not _has_hooks(model)


def test_initialize_without_config_passes_through(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _Recorder()
    monkeypatch.setattr(deepspeed, "initialize", rec)
    model = _tiny_model()
    ds_spngd.initialize(model=model)
    assert len(rec.calls) == 1 and rec.calls[0]["config"] is None and rec.calls[0]["model"] is model


def test_initialize_spngd_sets_gradient_clipping_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _Recorder(gas=4)
    monkeypatch.setattr(deepspeed, "initialize", rec)
    model = _tiny_model()
    user_cfg = _ds_config(lr=0.05, damping=0.01)
    snapshot = json.dumps(user_cfg, sort_keys=True)
    engine, opt, _, _ = ds_spngd.initialize(model=model, model_parameters=model.parameters(), config=user_cfg)
    assert len(rec.calls) == 1
    kw = rec.calls[0]
    handed = kw["config"]
    assert handed["gradient_clipping"] == 0
    assert "optimizer" not in handed
    assert handed["train_batch_size"] == 8
    assert json.dumps(user_cfg, sort_keys=True) == snapshot, "the user's dict must not be modified"
    spngd = kw["optimizer"]
    assert isinstance(spngd, ds_spngd.SPNGD)
    assert spngd.cfg.lr == 0.05 and spngd.cfg.damping == 0.01
    assert spngd.param_groups[0]["lr"] == 0.05
    assert kw["model"] is model
    assert [id(p) for p in kw["model_parameters"]] == [id(p) for p in model.parameters()]
    assert rec.step_ran_during_call is False, "SP-NGD's step ran while DeepSpeed built the engine"
    assert "step" not in vars(spngd), "SP-NGD's own step must be back after deepspeed.initialize"
    assert spngd.ctx.grad_accum_steps == 4
    assert ds_spngd.get_spngd(opt) is spngd
    assert _has_hooks(model)


def test_initialize_keeps_explicit_gradient_clipping(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _Recorder()
    monkeypatch.setattr(deepspeed, "initialize", rec)
    cfg = {**_ds_config(), "gradient_clipping": 2.5}
    ds_spngd.initialize(model=_tiny_model(), config=cfg)
    assert rec.calls[0]["config"]["gradient_clipping"] == 2.5


def test_initialize_args_config_file_not_passed_twice(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """With args.deepspeed_config, DeepSpeed must receive the edited dict and no config path in args."""
    rec = _Recorder()
    monkeypatch.setattr(deepspeed, "initialize", rec)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_ds_config(lr=0.3)))
    args = argparse.Namespace(deepspeed_config=str(path), local_rank=0)
    ds_spngd.initialize(args=args, model=_tiny_model())
    kw = rec.calls[0]
    assert kw["args"].deepspeed_config is None
    assert args.deepspeed_config == str(path), "the caller's args must not be modified"
    assert kw["config"]["gradient_clipping"] == 0 and "optimizer" not in kw["config"]
    assert kw["optimizer"].cfg.lr == 0.3


def test_initialize_spngd_type_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _Recorder()
    monkeypatch.setattr(deepspeed, "initialize", rec)
    cfg = _ds_config()
    cfg["optimizer"]["type"] = "spngd"
    ds_spngd.initialize(model=_tiny_model(), config=cfg)
    assert isinstance(rec.calls[0]["optimizer"], ds_spngd.SPNGD)


def test_initialize_rejects_optimizer_object_with_spngd_config(monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_deepspeed(monkeypatch)
    model = _tiny_model()
    with pytest.raises(ValueError, match="SPNGD"):
        ds_spngd.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=_ds_config())
