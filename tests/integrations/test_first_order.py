"""LARS / LAMB from pytorch-optimizer as DeepSpeed client optimizers (ds_spngd.integrations.deepspeed.first_order
via ds_spngd.initialize).

The engine tests run a real 1-rank DeepSpeed engine in-process (fixture ``single_rank_env``) and compare it with the
pytorch-optimizer class applied directly to a copy of the model, fed the learning rates DeepSpeed's scheduler chose.
"""

from __future__ import annotations

import copy
import inspect
from types import SimpleNamespace
from typing import Any

import deepspeed
import pytest
import pytorch_optimizer
import torch
import torch.nn.functional as F
from torch import nn

import ds_spngd
from ds_spngd.integrations.deepspeed import first_order
from ds_spngd.integrations.deepspeed.first_order import LambParams, LarsParams, OptimizerConfigError, parse_first_order

LIBRARY = {"lars": (LarsParams, pytorch_optimizer.LARS), "lamb": (LambParams, pytorch_optimizer.Lamb)}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _config(kind: str, clipping: bool = False, **params: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8,
                           "optimizer": {"type": kind, "params": params}}  # fmt: skip
    if clipping:
        cfg["gradient_clipping"] = 0
    return cfg


def _forbid_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        pytest.fail("deepspeed.initialize was called although the config is invalid")

    monkeypatch.setattr(deepspeed, "initialize", fail)


# ---------------------------------------------------------------- schema vs the library


@pytest.mark.parametrize("kind", ["lars", "lamb"])
def test_schema_keys_and_defaults_are_the_librarys(kind: str) -> None:
    schema, cls = LIBRARY[kind]
    signature = inspect.signature(cls.__init__).parameters
    for key, field in schema.model_fields.items():
        assert key in signature, f"{key} is not a parameter of {cls.__name__}"
        assert field.default == signature[key].default, key


@pytest.mark.parametrize(
    ("kind", "params", "key"),
    [
        ("LARS", {"lr": -0.1}, "optimizer.params.lr"),
        ("LARS", {"momentum": 1.0}, "optimizer.params.momentum"),
        ("LARS", {"trust_coefficient": 0}, "optimizer.params.trust_coefficient"),
        ("LARS", {"lr": True}, "optimizer.params.lr"),
        ("LARS", {"nesterov": "yes"}, "optimizer.params.nesterov"),
        ("LARS", {"eps": 1e-8}, "optimizer.params.eps"),  # not a LARS parameter
        ("Lamb", {"betas": [0.9, 1.5]}, "optimizer.params.betas"),
        ("Lamb", {"betas": [0.9]}, "optimizer.params.betas"),
        ("Lamb", {"weight_decay": -1}, "optimizer.params.weight_decay"),
        ("lamb", {"bias_correction": True}, "optimizer.params.bias_correction"),  # FusedLamb's, not pytorch-opt's
    ],
)
def test_bad_params_name_the_key(kind: str, params: dict[str, Any], key: str) -> None:
    with pytest.raises(OptimizerConfigError) as err:
        parse_first_order(_config(kind, **params))
    assert key in str(err.value)


def test_section_errors_are_all_named(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config("LARS", lr=-1)
    cfg["optimizer"].update(impl="fast", extra=1)
    with pytest.raises(OptimizerConfigError) as err:
        parse_first_order(cfg)
    text = str(err.value)
    assert "optimizer.extra: unknown key" in text and "optimizer.impl" in text and "optimizer.params.lr" in text
    assert isinstance(err.value, ds_spngd.SPNGDConfigError)  # one except catches every config error
    _forbid_deepspeed(monkeypatch)
    model = _model()
    with pytest.raises(OptimizerConfigError, match="optimizer.params.momentum"):
        ds_spngd.initialize(model=model, model_parameters=model.parameters(), config=_config("Lamb", momentum=0.9))


@pytest.mark.parametrize(
    ("cfg_update", "message"),
    [
        ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage=2 is not supported"),
        ({"fp16": {"enabled": True}}, "fp16.enabled=true is not supported"),
    ],
)
def test_unsupported_engine_settings_refused(
    monkeypatch: pytest.MonkeyPatch, cfg_update: dict[str, Any], message: str
) -> None:
    _forbid_deepspeed(monkeypatch)
    model = _model()
    with pytest.raises(OptimizerConfigError, match=message):
        ds_spngd.initialize(model=model, config={**_config("LARS", lr=0.1), **cfg_update})


def test_impl_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def recorder(**kwargs: Any) -> tuple[Any, Any, Any, Any]:
        calls.append(kwargs)
        return SimpleNamespace(), kwargs.get("optimizer"), None, None

    monkeypatch.setattr(deepspeed, "initialize", recorder)
    model = _model()
    monkeypatch.setattr(first_order, "deepspeed_has_fused_lamb", lambda: False)
    with pytest.raises(OptimizerConfigError, match="FusedLamb, a CUDA op"):
        ds_spngd.initialize(model=model, config={**_config("Lamb"), "optimizer": {"type": "Lamb", "impl": "deepspeed"}})
    with pytest.raises(OptimizerConfigError, match="DeepSpeed has no LARS"):
        ds_spngd.initialize(model=model, config={**_config("LARS"), "optimizer": {"type": "LARS", "impl": "deepspeed"}})
    ds_spngd.initialize(model=model, config=_config("Lamb", lr=0.01))
    assert isinstance(calls[-1]["optimizer"], pytorch_optimizer.Lamb) and "optimizer" not in calls[-1]["config"]
    assert calls[-1]["config"]["gradient_clipping"] == 0.0  # DeepSpeed's default 1.0 would rescale gradients

    monkeypatch.setattr(first_order, "deepspeed_has_fused_lamb", lambda: True)  # as on a CUDA machine
    cfg = _config("Lamb", lr=0.01, bias_correction=True)  # FusedLamb's params go to DeepSpeed unchecked
    cfg["optimizer"]["impl"] = "auto"
    ds_spngd.initialize(model=model, config=cfg)
    assert calls[-1]["optimizer"] is None
    assert calls[-1]["config"]["optimizer"] == {"type": "Lamb", "params": {"lr": 0.01, "bias_correction": True}}
    ds_spngd.initialize(model=model, config=_config("LARS", lr=0.01))  # LARS stays pytorch-optimizer's
    assert isinstance(calls[-1]["optimizer"], pytorch_optimizer.LARS)
    cfg["optimizer"] = {"type": "Lamb", "impl": "pytorch_optimizer", "params": {"lr": 0.01}}
    ds_spngd.initialize(model=model, config=cfg)
    assert isinstance(calls[-1]["optimizer"], pytorch_optimizer.Lamb)


# ---------------------------------------------------------------- real 1-rank engine vs the library applied directly


ENGINE_CASES = {
    "LARS": ({"lr": 0.5, "momentum": 0.9, "weight_decay": 0.01, "trust_coefficient": 0.02}, pytorch_optimizer.LARS),
    "Lamb": ({"lr": 0.02, "betas": [0.9, 0.99], "eps": 1e-6, "weight_decay": 0.01}, pytorch_optimizer.Lamb),
}


@pytest.mark.parametrize("kind", list(ENGINE_CASES))
def test_engine_steps_equal_the_library_with_the_schedulers_lr(single_rank_env: None, kind: str) -> None:
    params, cls = ENGINE_CASES[kind]
    model = _model()
    reference = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    cfg = _config(kind, **params)  # no gradient_clipping: ds_spngd must not let DeepSpeed clip at 1.0
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.1 * params["lr"],
                        "warmup_max_lr": params["lr"], "warmup_num_steps": 3, "warmup_type": "linear"}}  # fmt: skip
    engine, _, _, _ = ds_spngd.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    assert type(engine.basic_optimizer) is cls
    kwargs = {**params, "betas": tuple(params["betas"])} if "betas" in params else params
    direct = cls(reference.parameters(), **kwargs)
    gen = torch.Generator().manual_seed(1)
    lrs = []
    for _ in range(4):
        x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        lr = float(engine.get_lr()[0])
        lrs.append(lr)
        engine.backward(10 * F.cross_entropy(engine(x), y))  # gradient norm > 1: DeepSpeed's clip would act
        engine.step()
        for group in direct.param_groups:
            group["lr"] = lr
        direct.zero_grad()
        (10 * F.cross_entropy(reference(x), y)).backward()
        assert torch.cat([p.grad.flatten() for p in reference.parameters()]).norm() > 2  # type: ignore[union-attr]
        direct.step()
        for got, want in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert len(set(lrs)) > 1 and max(lrs) <= params["lr"]  # the scheduler drove the lr
    moved = max(float((p.detach() - s).abs().max()) for p, s in zip(model.parameters(), start, strict=True))
    assert moved > 1e-3


def test_bf16_wrapper_does_not_step_the_optimizer_while_built(single_rank_env: None) -> None:
    """DeepSpeed's stage-0 bf16 wrapper calls the inner step() once with zero gradients while it is built; for LARS
    with weight decay that step would move the fp32 master weights and fill the momentum."""
    model = _model()
    start = [p.detach().clone() for p in model.parameters()]
    cfg = {**_config("LARS", lr=0.5, weight_decay=0.01, trust_coefficient=0.02), "bf16": {"enabled": True}}
    engine, _, _, _ = ds_spngd.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    inner = engine.basic_optimizer
    assert isinstance(inner, pytorch_optimizer.LARS) and len(inner.state) == 0
    masters = [p for g in inner.param_groups for p in g["params"]]
    for master, s in zip(masters, start, strict=True):  # fp32 copies of the bf16-cast weights, not moved
        assert master.dtype == torch.float32 and torch.equal(master, s.to(torch.bfloat16).float())
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    engine.backward(F.cross_entropy(engine(x.to(torch.bfloat16)).float(), y))
    engine.step()
    assert len(inner.state) == 4 and all(torch.isfinite(p).all() for p in model.parameters())
