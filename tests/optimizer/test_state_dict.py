"""SP-NGD's state_dict: torch.optim's contract plus the factors, and an exact resume."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ds_spngd import SPNGD


class Net(nn.Module):
    def __init__(self, norm: str = "bn") -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        if norm == "bn":
            self.bn = nn.BatchNorm1d(5)
        else:
            self.ln = nn.LayerNorm(5)
        self.fc2 = nn.Linear(5, 3)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.fc1(x)) if self.norm == "bn" else self.ln(self.fc1(x))
        return self.fc2(torch.relu(h))


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(n)]


def _train(model: nn.Module, opt: SPNGD, batches: list[tuple[torch.Tensor, torch.Tensor]], lrs: list[float]) -> None:
    for (x, y), lr in zip(batches, lrs, strict=True):
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}  # parameters and BN buffers


CONFIGS = [
    {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "factor_decay": 0.95},
    {"lr": 0.1, "momentum": 0.9, "inverse_method": "eigen", "factor_decay": 0.0, "weight_rescale": True},
    {"lr": 0.1, "momentum": 0.9, "factor_update_steps": 2, "inv_update_steps": 2, "kl_clip": 1e-2},
]


def test_state_dict_layout() -> None:
    torch.manual_seed(0)
    m = Net()
    opt = SPNGD(m.parameters(), model=m, config={"lr": 0.1})
    _train(m, opt, _batches(3), [0.1, 0.1, 0.1])
    sd = opt.state_dict()
    assert {"state", "param_groups", "spngd"} <= set(sd)
    assert len(sd["param_groups"]) == 1
    assert sd["param_groups"][0]["params"] == list(range(6))
    assert sd["param_groups"][0]["lr"] == 0.1 and sd["param_groups"][0]["momentum"] == 0.9
    assert set(sd["state"]) == set(range(6)) and all("momentum_buffer" in s for s in sd["state"].values())
    extra = sd["spngd"]
    assert extra["steps"] == 3 and extra["world_size"] == 1
    assert extra["config"]["lr"] == 0.1
    assert set(extra["blocks"]) == {"fc1", "bn", "fc2"}
    assert set(extra["blocks"]["fc1"]) == {"fc1.A", "fc1.G", "preconditioner", "method", "ready"}
    assert len(extra["blocks"]["fc1"]["preconditioner"]) == 2  # (A⁻¹, G⁻¹) of the "inverse" method
    a = extra["blocks"]["fc1"]["fc1.A"]
    assert a["version"] == 3 and a["value"].shape == (1, 7, 7)
    assert extra["blocks"]["bn"]["bn.F"]["value"].shape == (5, 2, 2)


def test_state_dict_plain_sgd_fields_load_into_torch_sgd() -> None:
    """The torch.optim part is a valid SGD state_dict: momentum buffers are η·d for SP-NGD, so only the layout is
    compared here."""
    torch.manual_seed(0)
    m = Net()
    opt = SPNGD(m.parameters(), model=m, config={"lr": 0.1})
    _train(m, opt, _batches(2), [0.1, 0.1])
    sd = copy.deepcopy(opt.state_dict())
    del sd["spngd"]
    sgd = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    sgd.load_state_dict(sd)
    assert len(sgd.state) == 6


def _check_resume(cfg: dict[str, Any], split: int) -> None:
    torch.manual_seed(1)
    base = Net()
    batches = _batches(split + 3, seed=2)
    lrs = [0.1, 0.1, 0.05, 0.2, 0.15, 0.1][: split + 3]

    m = copy.deepcopy(base)
    opt = SPNGD(m.parameters(), model=m, config=cfg)
    _train(m, opt, batches[:split], lrs[:split])
    saved = copy.deepcopy(opt.state_dict())  # what torch.save would keep
    resumed_model = Net()
    resumed_model.load_state_dict(copy.deepcopy(m.state_dict()))
    _train(m, opt, batches[split:], lrs[split:])  # the uninterrupted run

    opt2 = SPNGD(resumed_model.parameters(), model=resumed_model, config=cfg)
    opt2.load_state_dict(saved)
    assert opt2.steps == split
    _train(resumed_model, opt2, batches[split:], lrs[split:])

    want, got = _params(m), _params(resumed_model)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-7, msg=lambda s, n=n: f"{n}: {s}")
    assert opt2.steps == opt.steps


@pytest.mark.parametrize("cfg", CONFIGS, ids=["inverse-decay", "eigen-rescale", "fus2-klclip"])
@pytest.mark.parametrize("split", [2, 3])
def test_resume_matches_uninterrupted_run(cfg: dict[str, Any], split: int) -> None:
    _check_resume(cfg, split)


@pytest.mark.parametrize("split", [2, 3])
def test_resume_inside_an_inversion_interval(split: int) -> None:
    """inv_update_steps=3 > factor_update_steps=1: resuming at step 2 must keep using the inverses of step 0, as the
    uninterrupted run does (split 3 resumes on an inversion step)."""
    _check_resume({"lr": 0.1, "momentum": 0.9, "factor_update_steps": 1, "inv_update_steps": 3}, split)


def test_resume_on_deep_copy_of_the_model() -> None:
    """The brief's recipe: a deep copy of the trained model (hooks of the first optimizer come along) and a fresh
    optimizer on it."""
    torch.manual_seed(3)
    m = Net()
    cfg = {"lr": 0.1, "momentum": 0.9, "factor_decay": 0.9}
    opt = SPNGD(m.parameters(), model=m, config=cfg)
    batches = _batches(5, seed=4)
    _train(m, opt, batches[:2], [0.1, 0.1])
    saved = copy.deepcopy(opt.state_dict())
    m2 = copy.deepcopy(m)
    _train(m, opt, batches[2:], [0.1, 0.05, 0.05])
    opt2 = SPNGD(m2.parameters(), model=m2, config=cfg)
    opt2.load_state_dict(saved)
    _train(m2, opt2, batches[2:], [0.1, 0.05, 0.05])
    want, got = _params(m), _params(m2)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-7)


def test_loaded_factors_are_copies() -> None:
    torch.manual_seed(5)
    m = Net()
    opt = SPNGD(m.parameters(), model=m, config={"factor_decay": 0.5})
    _train(m, opt, _batches(2), [0.01, 0.01])
    sd = copy.deepcopy(opt.state_dict())
    value = sd["spngd"]["blocks"]["fc1"]["fc1.A"]["value"]
    snapshot = value.clone()
    m2 = copy.deepcopy(m)
    opt2 = SPNGD(m2.parameters(), model=m2, config={"factor_decay": 0.5})
    opt2.load_state_dict(sd)
    _train(m2, opt2, _batches(2, seed=9), [0.01, 0.01])
    assert torch.equal(value, snapshot), "training after load modified the checkpoint's factor in place"


def test_load_into_model_with_different_layers_names_blocks() -> None:
    torch.manual_seed(6)
    m = Net("bn")
    opt = SPNGD(m.parameters(), model=m)
    _train(m, opt, _batches(2), [0.01, 0.01])
    sd = copy.deepcopy(opt.state_dict())
    other = Net("ln")  # same parameter count, a LayerNorm "ln" instead of the BatchNorm "bn"
    opt_other = SPNGD(other.parameters(), model=other)
    with pytest.raises(ValueError) as err:
        opt_other.load_state_dict(sd)
    msg = str(err.value)
    assert "bn" in msg and "ln" in msg


class Deeper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5, 4)
        self.fc3 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.bn(self.fc1(x))))))


def test_load_into_model_with_extra_layer_names_blocks() -> None:
    """A checkpoint of Net loaded into a model with an extra layer: the error names the Fisher blocks (not only
    torch.optim's generic parameter-group size message)."""
    torch.manual_seed(7)
    m = Net("bn")
    opt = SPNGD(m.parameters(), model=m)
    _train(m, opt, _batches(1), [0.01])
    sd = copy.deepcopy(opt.state_dict())
    other = Deeper()
    opt_other = SPNGD(other.parameters(), model=other)
    with pytest.raises(ValueError) as err:
        opt_other.load_state_dict(sd)
    assert "fc3" in str(err.value)


def test_failed_load_leaves_optimizer_untouched() -> None:
    torch.manual_seed(8)
    m = Net("bn")
    opt = SPNGD(m.parameters(), model=m)
    _train(m, opt, _batches(1), [0.01])
    sd = copy.deepcopy(opt.state_dict())
    other = Net("ln")
    opt_other = SPNGD(other.parameters(), model=other, config={"lr": 0.3})
    _train(other, opt_other, _batches(1, seed=1), [0.3])
    before = copy.deepcopy(opt_other.state_dict())
    with pytest.raises(ValueError):
        opt_other.load_state_dict(sd)
    after = opt_other.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k in before["state"]:
        assert torch.equal(after["state"][k]["momentum_buffer"], before["state"][k]["momentum_buffer"])


def test_load_without_spngd_entry_keeps_factors() -> None:
    """A plain torch.optim state_dict (no 'spngd' entry) loads the momentum state only."""
    torch.manual_seed(9)
    m = Net()
    opt = SPNGD(m.parameters(), model=m)
    _train(m, opt, _batches(2), [0.01, 0.01])
    sd = copy.deepcopy(opt.state_dict())
    del sd["spngd"]
    m2 = copy.deepcopy(m)
    opt2 = SPNGD(m2.parameters(), model=m2)
    opt2.load_state_dict(sd)
    assert opt2.steps == 0 and len(opt2.state) == 6
