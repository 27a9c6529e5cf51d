"""Adversarial training in the lab's loop (ds_spngd_lab.adversarial): FGSM / PGD against torch.autograd by hand,
ConAdv's stale weights against a fresh model loaded with the previous step's weights (through the real loop and a
1-rank DeepSpeed SP-NGD engine), the combined loss, ε = 0 against clean training, and named config errors."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ds_spngd
from ds_spngd_lab.adversarial import (
    AdversarialConfig,
    AdversarialConfigError,
    AdversarialStep,
    AdversarialTask,
    interleave,
    parse_adversarial,
)
from ds_spngd_lab.loop import TOP1, LoopPlan, TrainingLoop
from ds_spngd_lab.models.cnn import SmallCNN
from ds_spngd_lab.models.gpt import GPT, GPTConfig

BLOCKS = ((4, 1), (8, 2))  # a 2-block BatchNorm CNN, 1×8×8 inputs, 4 classes
IMAGE_TASK = AdversarialTask(prepare=lambda x: x, criterion=lambda z, y: F.cross_entropy(z, y))


class ModelEngine:
    """Stand-in for the DeepSpeed engine where only the forward matters: ``module`` and ``engine(x)``; records the
    inputs of every forward."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.inputs: list[Tensor] = []

    def __call__(self, x: Tensor) -> Any:
        self.inputs.append(x)
        return self.module(x)


def _cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(num_classes=4, in_channels=1, blocks=BLOCKS)


def _batch(n: int = 8, seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def _cfg(**kw: Any) -> AdversarialConfig:
    return AdversarialConfig.model_validate({"enabled": True, "epsilon": 0.1, **kw})


def _input_grad(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """∂ CE(model(x), y) / ∂x by torch.autograd on the model itself (train mode: BatchNorm batch statistics)."""
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return g


# ---------------------------------------------------------------- perturbation


def test_fgsm_is_epsilon_sign_of_the_input_gradient() -> None:
    model = _cnn()
    step = AdversarialStep(_cfg(mode="plain", epsilon=0.05), ModelEngine(model), IMAGE_TASK)
    x, y = _batch()
    delta = step.perturbation(x, y, {n: p.detach() for n, p in model.named_parameters()})
    want = 0.05 * _input_grad(copy.deepcopy(model), x, y).sign()
    assert torch.equal(delta, want)
    assert model.features[0][0].weight.grad is None  # no weight gradient from the perturbation pass


def test_pgd_matches_projected_sign_steps_by_hand() -> None:
    model = _cnn()
    step = AdversarialStep(_cfg(mode="plain", epsilon=0.1, steps=3, step_size=0.04), ModelEngine(model), IMAGE_TASK)
    x, y = _batch()
    ref = copy.deepcopy(model)
    want = torch.zeros_like(x)
    for _ in range(3):
        want = (want + 0.04 * _input_grad(ref, x + want, y).sign()).clamp(-0.1, 0.1)
    assert torch.allclose(step.perturbation(x, y, step._params(stale=False)), want, atol=1e-7)
    assert _cfg(steps=4).alpha == pytest.approx(2.5 * 0.1 / 4) and _cfg().alpha == 0.1


def test_combined_loss_is_the_weighted_clean_and_adversarial_loss() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 4))  # no batch statistics
    engine = ModelEngine(model)
    step = AdversarialStep(_cfg(mode="plain", epsilon=0.2, clean_weight=0.3), engine, IMAGE_TASK)
    x, y = _batch()
    loss = step.loss(x, y)
    delta = 0.2 * _input_grad(model, x, y).sign()
    want = 0.3 * F.cross_entropy(model(x), y) + 0.7 * F.cross_entropy(model(x + delta), y)
    assert torch.allclose(loss, want, atol=1e-6)
    (seen,) = engine.inputs  # one engine forward on the 2N interleaved examples
    assert seen.shape[0] == 16 and torch.equal(seen[0::2], x) and torch.allclose(seen[1::2], x + delta)
    assert torch.equal(interleave(torch.zeros(2, 3), torch.ones(2, 3))[:, 0], torch.tensor([0.0, 1, 0, 1]))


def test_text_site_perturbs_the_token_embedding_output() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=11, n_layer=1, n_head=2, n_embd=8, n_positions=6))
    task = AdversarialTask(prepare=lambda x: x,
                           criterion=lambda z, y: F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1)))
    engine = ModelEngine(model)
    step = AdversarialStep(_cfg(mode="plain", epsilon=0.01, site="tok_embed", clean_weight=0.5), engine, task)
    ids, y = torch.randint(0, 11, (3, 6)), torch.randint(0, 11, (3, 6))
    # reference: the embedding output replaced by a leaf, gradient by torch.autograd
    leaf: list[Tensor] = []
    handle = model.tok_embed.register_forward_hook(
        lambda _m, _i, out: leaf.append(out.detach().requires_grad_(True)) or leaf[-1])
    loss = task.criterion(model(ids), y)
    handle.remove()
    (g,) = torch.autograd.grad(loss, leaf[0])
    delta = step.perturbation(ids, y, step._params(stale=False))
    assert delta.shape == (3, 6, 8) and torch.equal(delta, 0.01 * g.sign())
    combined = step.loss(ids, y)
    handle = model.tok_embed.register_forward_hook(lambda _m, _i, out: out + delta)
    adv = task.criterion(model(ids), y)
    handle.remove()
    assert torch.allclose(combined, 0.5 * task.criterion(model(ids), y) + 0.5 * adv, atol=1e-6)
    no_site = AdversarialStep(_cfg(mode="plain"), ModelEngine(model), task)
    with pytest.raises(AdversarialConfigError, match="adversarial.site"):
        no_site.perturbation(ids, y, no_site._params(stale=False))


# ---------------------------------------------------------------- through the loop and a DeepSpeed engine


def _spngd_engine(gas: int = 1, micro: int = 8) -> Any:
    model = _cnn()
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas, "gradient_clipping": 0,
           "steps_per_print": 10**9, "zero_optimization": {"stage": 0},
           "optimizer": {"type": "SPNGD", "params": {"lr": 0.1, "momentum": 0.9, "damping": 0.01,
                                                     "factor_update_steps": 1, "inv_update_steps": 1,
                                                     "factor_sample_fraction": 1.0}}}  # fmt: skip
    engine, _, _, _ = ds_spngd.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


class Batches:
    """Epoch e: fixed random micro-batches (seeded by e and the index)."""

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(4):
            yield _batch(8, seed=100 * epoch + i)


def _run(engine: Any, adversarial: AdversarialStep | None, steps: int, gas: int, tmp: Path) -> None:
    plan = LoopPlan(total_steps=steps, steps_per_epoch=4 // gas, global_batch=8 * gas, micro_batches=gas,
                    eval_interval=10**6, desc="adv")  # fmt: skip
    loop = TrainingLoop(engine, plan, TOP1, lambda x, y: F.cross_entropy(engine(x), y), lambda: 0.0, rank=0, world=1,
                        skips_nonfinite=False, adversarial=adversarial)  # fmt: skip
    loop.run(Batches(), tmp / "steps.csv")


@pytest.mark.parametrize("gas", [1, 2])
def test_conadv_uses_the_previous_steps_weights(single_rank_env: None, tmp_path: Path, gas: int) -> None:
    engine = _spngd_engine(gas)
    step = AdversarialStep(_cfg(mode="conadv", epsilon=0.05), engine, IMAGE_TASK)
    seen: list[tuple[int, Tensor, Tensor, Tensor]] = []  # (optimizer step, inputs, targets, δ) of every micro-batch
    weights = [copy.deepcopy(engine.module.state_dict())]  # w_0, w_1, ...
    engine_loss, before_update = step._engine_loss, step.before_update

    def record_loss(inputs: Tensor, delta: Tensor, y: Tensor) -> Tensor:
        seen.append((len(weights) - 1, inputs, y, delta))
        return engine_loss(inputs, delta, y)

    def record_update() -> None:
        before_update()
        weights.append(None)  # type: ignore[arg-type]  # filled after the update, below

    step._engine_loss, step.before_update = record_loss, record_update  # type: ignore[method-assign]
    plain_step = engine.step

    def step_and_keep() -> None:
        plain_step()
        if weights[-1] is None:
            weights[-1] = copy.deepcopy(engine.module.state_dict())

    engine.step = step_and_keep
    _run(engine, step, steps=6 // gas, gas=gas, tmp=tmp_path)  # crosses an epoch boundary (4 micro-batches each)
    assert len(seen) == 6 and len(weights) == 6 // gas + 1
    for t, x, y, delta in seen:
        stale = _cnn()
        stale.load_state_dict(weights[max(t - 1, 0)])
        assert torch.equal(delta, 0.05 * _input_grad(stale, x, y).sign()), f"step {t}"
        if t >= 1:
            current = _cnn()
            current.load_state_dict(weights[t])
            assert not torch.equal(delta, 0.05 * _input_grad(current, x, y).sign()), f"step {t}"


@pytest.mark.parametrize("mode", ["conadv", "plain"])
def test_zero_epsilon_trains_like_clean_training(single_rank_env: None, tmp_path: Path, mode: str) -> None:
    clean = _spngd_engine()
    _run(clean, None, steps=3, gas=1, tmp=tmp_path)
    adv = _spngd_engine()
    _run(adv, AdversarialStep(_cfg(mode=mode, epsilon=0.0), adv, IMAGE_TASK), steps=3, gas=1, tmp=tmp_path)
    start = _cnn().state_dict()
    for (name, p), q in zip(clean.module.named_parameters(), adv.module.parameters(), strict=True):
        assert not torch.equal(p, start[name])  # it trained
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), name


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(("section", "key"), [
    ({"enabled": True}, "adversarial.epsilon"),  # required when enabled
    ({"enabled": True, "epsilon": -0.1}, "adversarial.epsilon"),
    ({"enabled": True, "epsilon": 0.1, "steps": 0}, "adversarial.steps"),
    ({"enabled": True, "epsilon": 0.1, "steps": True}, "adversarial.steps"),
    ({"enabled": True, "epsilon": 0.1, "step_size": 0}, "adversarial.step_size"),
    ({"enabled": True, "epsilon": 0.1, "clean_weight": 1.5}, "adversarial.clean_weight"),
    ({"enabled": True, "epsilon": 0.1, "mode": "disadv"}, "adversarial.mode"),
    ({"enabled": "yes", "epsilon": 0.1}, "adversarial.enabled"),
    ({"enabled": True, "epsilon": 0.1, "tau": 2}, "adversarial.tau"),
])  # fmt: skip
def test_config_errors_name_the_key(section: dict[str, Any], key: str) -> None:
    with pytest.raises(AdversarialConfigError, match=key.replace(".", r"\.")):
        parse_adversarial({"adversarial": section})


def test_config_defaults_and_other_errors() -> None:
    assert parse_adversarial({}).enabled is False
    cfg = parse_adversarial({"adversarial": {"enabled": True, "epsilon": 0.1}})
    assert (cfg.mode, cfg.steps, cfg.alpha, cfg.clean_weight, cfg.site) == ("conadv", 1, 0.1, 0.5, None)
    assert cfg.describe() == "conadv eps=0.1 steps=1 alpha=0.1 clean_weight=0.5"
    with pytest.raises(AdversarialConfigError, match="must be an object"):
        parse_adversarial({"adversarial": [1]})
    with pytest.raises(AdversarialConfigError, match="stage 3"):
        parse_adversarial({"adversarial": {"enabled": True, "epsilon": 0.1}, "zero_optimization": {"stage": 3}})
    with pytest.raises(AdversarialConfigError, match="adversarial.site.*'nope'"):
        AdversarialStep(_cfg(site="nope"), ModelEngine(_cnn()), IMAGE_TASK)
    with pytest.raises(ValueError, match="enabled"):
        AdversarialStep(AdversarialConfig.model_validate({}), ModelEngine(_cnn()), IMAGE_TASK)
