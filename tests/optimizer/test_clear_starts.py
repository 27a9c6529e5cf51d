"""Clear starts: a mistyped key gets a did-you-mean, a model SP-NGD barely preconditions gets a warning, and an SP-NGD
handed to ``deepspeed.initialize`` directly raises at start naming ``ds_spngd.initialize`` (:mod:`ds_spngd.startup`).

The DeepSpeed tests run a real 1-rank engine in-process (fixture ``single_rank_env``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any

import deepspeed
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ds_spngd
from ds_spngd import SPNGD
from ds_spngd.config import SPNGDConfig, SPNGDConfigError, parse_spngd_params
from ds_spngd.startup import MAX_LISTED, NOT_ATTACHED_MESSAGE, coverage, fallback_params, warn_if_little_preconditioned

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- 1. unknown keys: did you mean ----------------------------------------------------------------------------
def test_several_typos_each_get_their_suggestion_in_one_error() -> None:
    with pytest.raises(SPNGDConfigError) as err:
        parse_spngd_params({"dampnig": 1e-3, "momentum_corection": True, "lr": -1.0, "Factor_Decay": 0.5,
                            "inv_update_step": 2})
    msg = str(err.value)
    assert "optimizer.params.dampnig: unknown key; did you mean 'damping'?" in msg
    assert "optimizer.params.momentum_corection: unknown key; did you mean 'momentum_correction'?" in msg
    assert "optimizer.params.Factor_Decay: unknown key; did you mean 'factor_decay'?" in msg
    assert "optimizer.params.inv_update_step: unknown key; did you mean 'inv_update_steps'?" in msg
    assert "optimizer.params.lr: " in msg  # the other errors stay in the same message
    assert "the keys of optimizer.params are" not in msg  # every unknown key had a close match


def test_unknown_key_without_close_match_lists_the_keys() -> None:
    with pytest.raises(SPNGDConfigError) as err:
        parse_spngd_params({"zzz_mystery": 1, "dampnig": 0.1}, prefix="cfg.opt")
    msg = str(err.value)
    assert "cfg.opt.zzz_mystery: unknown key (no SP-NGD key is close to it)" in msg
    assert "cfg.opt.dampnig: unknown key; did you mean 'damping'?" in msg
    listing = next(line for line in msg.splitlines() if "the keys of cfg.opt are: " in line)
    assert listing.split(": ", 1)[1].split(", ") == sorted(SPNGDConfig.model_fields)


def test_constructor_override_typo_gets_suggestion() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(SPNGDConfigError, match="did you mean 'kl_clip'"):
        SPNGD(model.parameters(), model=model, klclip=0.1)


# ---- 2. little or nothing preconditioned ----------------------------------------------------------------------
class Custom(nn.Module):
    """A layer SP-NGD has no Fisher block for (raw nn.Parameters)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)
        self.b = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.t() + self.b


class MostlyCustom(nn.Module):
    """12 custom layers and a root parameter (1,259 elements) and one nn.Linear head (63): 4.8% preconditioned."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(10))
        self.layers = nn.ModuleList([Custom(10, 20) if i == 0 else Custom(20, 20 - i) for i in range(3)]
                                    + [Custom(3, 3 + i) for i in range(9)])
        self.head = nn.Linear(20, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.layers[0](x * self.scale)))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ds_spngd" and r.levelno == logging.WARNING
            and "Fisher blocks precondition" in r.getMessage()]


def test_no_supported_layer_warns(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Custom(4, 6), nn.ReLU(), Custom(6, 2))
    with caplog.at_level(logging.WARNING, logger="ds_spngd"):
        opt = SPNGD(model.parameters(), model=model)
    assert opt.blocks == [] and coverage(opt) == (0, 44)
    (msg,) = _warnings(caplog)
    assert "precondition 0.0% of the optimizer's 44 trainable parameter elements (0): nothing is preconditioned" in msg
    lines = msg.splitlines()
    assert lines[1].startswith("  0.w [6, 4] = 24 elements, in 0 (Custom): no Fisher block")  # largest first
    assert lines[2].startswith("  2.w [2, 6] = 12 elements, in 2 (Custom): ")
    assert "min_preconditioned_fraction" in lines[-1] and "nn.Linear" in lines[-1]


def test_under_threshold_warns_with_the_largest_parameters(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = MostlyCustom()
    with caplog.at_level(logging.WARNING, logger="ds_spngd"):
        opt = SPNGD(model.parameters(), model=model)
    covered, total = coverage(opt)
    assert covered == 63 and 0 < covered / total < 0.5
    (msg,) = _warnings(caplog)
    assert f"precondition {covered / total:.1%} of the optimizer's {total:,} trainable parameter elements" in msg
    assert "below min_preconditioned_fraction=0.5" in msg
    rest = fallback_params(opt, model)
    assert len(rest) == 25 and [f.numel for f in rest] == sorted((f.numel for f in rest), reverse=True)
    listed = [line for line in msg.splitlines() if line.startswith("  ") and " elements, in " in line]
    assert len(listed) == MAX_LISTED
    assert listed[0] == ("  layers.1.w [19, 20] = 380 elements, in layers.1 (Custom): no Fisher block: "
                         "Custom (parameters ['b', 'w'])")  # the reason SPNGD.report() gives for that module
    assert f"  and {25 - MAX_LISTED} more" in msg.splitlines()
    assert f"Fisher blocks cover {covered / total:.1%}" in opt.report()


def test_root_parameter_and_parameter_outside_the_model(caplog: pytest.LogCaptureFixture) -> None:
    model = MostlyCustom()
    extra = nn.Parameter(torch.zeros(1000))
    with caplog.at_level(logging.WARNING, logger="ds_spngd"):
        opt = SPNGD([*model.parameters(), extra], model=model)
    rest = fallback_params(opt, model)
    assert (rest[0].module, rest[0].module_type, rest[0].reason) == ("", "", "not a parameter of the model")
    scale = next(f for f in rest if f.name == "scale")
    assert scale.module == scale.module_type == "MostlyCustom" and "scale" in scale.reason
    assert "outside the model: not a parameter of the model" in _warnings(caplog)[0]


def test_normal_mlp_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    model = _mlp()
    with caplog.at_level(logging.DEBUG, logger="ds_spngd"):
        opt = SPNGD(model.parameters(), model=model, min_preconditioned_fraction=1.0)
    assert coverage(opt) == (83, 83) and not _warnings(caplog)
    assert "Fisher blocks cover 100.0% of the 83 trainable parameter elements (83)" in opt.report()


def test_threshold_zero_warns_only_when_nothing_is_preconditioned(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ds_spngd"):
        model = MostlyCustom()
        SPNGD(model.parameters(), model=model, min_preconditioned_fraction=0.0)
        assert not _warnings(caplog)
        model = MostlyCustom()
        SPNGD(model.parameters(), model=model, min_preconditioned_fraction=0.02)
        assert not _warnings(caplog)  # 4.8% ≥ 2%
        custom = Custom(3, 3)
        SPNGD(custom.parameters(), model=custom, min_preconditioned_fraction=0.0)
        assert "nothing is preconditioned" in _warnings(caplog)[0]


def test_warning_on_rank_zero_only(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    custom = Custom(3, 3)
    opt = SPNGD(custom.parameters(), model=custom)
    caplog.clear()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 1)
    with caplog.at_level(logging.WARNING, logger="ds_spngd"):
        message = warn_if_little_preconditioned(opt, custom)
    assert message is not None and "nothing is preconditioned" in message  # every rank computes it
    assert not _warnings(caplog)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 0)
    with caplog.at_level(logging.WARNING, logger="ds_spngd"):
        warn_if_little_preconditioned(opt, custom)
    assert _warnings(caplog) == [message]


def test_warning_visible_at_pythons_default_log_level() -> None:
    """No logging configured: logging's last-resort handler prints WARNING records to stderr."""
    code = ("import torch; from torch import nn; from ds_spngd import SPNGD\n"
            "SPNGD([nn.Parameter(torch.zeros(3, 5))], model=nn.Module())\n")
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          check=True)
    assert "SP-NGD: Fisher blocks precondition 0.0% of the optimizer's 15 trainable parameter elements" in done.stderr
    assert "  parameter #0 [3, 5] = 15 elements, in outside the model" in done.stderr


@pytest.mark.parametrize("value", [-0.1, 1.5, True, "half", None])
def test_threshold_key_validated(value: Any) -> None:
    with pytest.raises(SPNGDConfigError) as err:
        parse_spngd_params({"min_preconditioned_fraction": value})
    assert "optimizer.params.min_preconditioned_fraction" in str(err.value)


@pytest.mark.parametrize("value", [0, 0.0, 0.25, 1, 1.0])
def test_threshold_key_accepted(value: float) -> None:
    assert parse_spngd_params({"min_preconditioned_fraction": value}).min_preconditioned_fraction == value


# ---- 3. SP-NGD handed to deepspeed.initialize directly ---------------------------------------------------------
def _data(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=gen)
    y = torch.randint(0, 3, (8,), generator=gen)
    return [(x, y)] * n


def _step(opt: SPNGD, model: nn.Module) -> float:
    x, y = _data(1)[0]
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def test_plain_torch_keeps_stepping_and_rebuilt_lists_pass() -> None:
    model = _mlp()
    opt = SPNGD(model.parameters(), model=model, lr=0.1)
    losses = [_step(opt, model) for _ in range(3)]
    opt.param_groups[0]["params"] = list(opt.param_groups[0]["params"])  # same tensors, new list: fine
    losses.append(_step(opt, model))
    assert opt.steps == 4 and losses[-1] < losses[0]


@pytest.mark.parametrize("replacement", ["fp32_clones", "flat_partition", "zero3_empty", "zero3_one_partition"])
def test_replaced_params_raise_before_anything_changes(replacement: str) -> None:
    model = _mlp()
    opt = SPNGD(model.parameters(), model=model, lr=0.1)
    x, y = _data(1)[0]
    F.cross_entropy(model(x), y).backward()
    params = [p for g in opt.param_groups for p in g["params"]]
    flat = torch.cat([p.detach().flatten() for p in params]).requires_grad_()
    flat.grad = torch.zeros_like(flat)
    new = {"fp32_clones": [p.detach().clone().requires_grad_() for p in params], "flat_partition": [flat],
           "zero3_empty": [], "zero3_one_partition": [flat[:10].detach().requires_grad_()]}[replacement]
    opt.param_groups[0]["params"] = new
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError) as err:
        opt.step()
    assert str(err.value) == NOT_ATTACHED_MESSAGE
    assert opt.steps == 0 and len(opt.state) == 0
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_engine_setup_turns_the_check_off() -> None:
    model = _mlp()
    opt = SPNGD(model.parameters(), model=model, lr=0.1)
    assert opt._param_guard is not None
    opt.setup_distributed(None)  # what an engine integration (ds_spngd.integrations.deepspeed.engine.attach) does
    assert opt._param_guard is None
    assert _step(opt, model) > 0 and opt.steps == 1


def _direct(model: nn.Module, cfg: dict[str, Any]) -> tuple[Any, SPNGD]:
    opt = SPNGD(model.parameters(), model=model, lr=0.1, damping=0.01)
    base = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config={**base, **cfg})
    return engine, opt


def _check_message(err: pytest.ExceptionInfo[RuntimeError]) -> None:
    msg = str(err.value)
    assert msg == NOT_ATTACHED_MESSAGE
    for part in ("deepspeed.initialize", "ds_spngd.initialize(", "ds_spngd.integrations.transformers",
                 "ds_spngd.integrations.accelerate"):
        assert part in msg


def test_direct_deepspeed_zero2_raises_at_first_step(single_rank_env: None) -> None:
    model = _mlp()
    engine, opt = _direct(model, {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True})
    x, y = _data(1)[0]
    engine.backward(F.cross_entropy(engine(x), y))
    with pytest.raises(RuntimeError) as err:
        engine.step()
    _check_message(err)
    assert opt.steps == 0


def test_direct_deepspeed_zero3_raises_at_first_step(single_rank_env: None) -> None:
    """ZeRO-3 leaves ``param_groups[i]["params"] == []`` between steps and puts one partition in during its step."""
    model = _mlp()
    engine, opt = _direct(model, {"zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True})
    assert all(g["params"] == [] for g in opt.param_groups)
    x, y = _data(1)[0]
    engine.backward(F.cross_entropy(engine(x), y))
    with pytest.raises(RuntimeError) as err:
        engine.step()
    _check_message(err)
    assert opt.steps == 0


def test_direct_deepspeed_bf16_raises_during_initialize(single_rank_env: None) -> None:
    model = _mlp()
    with pytest.raises(RuntimeError) as err:  # the bf16 wrapper steps the client optimizer while it is built
        _direct(model, {"bf16": {"enabled": True}})
    _check_message(err)


def test_direct_deepspeed_stage0_fp32_trains(single_rank_env: None) -> None:
    model = _mlp()
    engine, opt = _direct(model, {})
    assert engine.optimizer is opt
    losses = []
    for x, y in _data(4):
        loss = F.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert opt.steps == 4 and losses[-1] < 0.9 * losses[0], losses


def test_ds_spngd_initialize_bf16_is_not_refused(single_rank_env: None) -> None:
    """Through ds_spngd.initialize the engine glue turns the check off: stage-0 bf16 (fp32 clones) trains."""
    model = _mlp()
    cfg = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8, "bf16": {"enabled": True},
           "optimizer": {"type": "SPNGD", "params": {"lr": 0.1, "damping": 0.01}}}
    engine, _, _, _ = ds_spngd.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    spngd = ds_spngd.get_spngd(engine)
    assert spngd is not None and spngd._param_guard is None
    losses = []
    for x, y in _data(3):
        loss = F.cross_entropy(engine(x.to(torch.bfloat16)).float(), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert spngd.steps == 3 and losses[-1] < losses[0], losses
