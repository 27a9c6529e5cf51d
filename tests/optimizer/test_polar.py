"""``direction: "polar"`` against independent references.

* Newton–Schulz against the SVD: the output keeps the input's singular vectors (Uᵀ·NS(X)·V is diagonal) and pushes
  every singular value into Muon's band around 1.
* The step against a dense K-FAC reference: per-example gradients from ``torch.func``, the damped G ⊗ A built with
  ``torch.kron`` and solved in fp64 (``tests/optimizer/test_curvature.py``), the momentum / Nesterov / shape-scale
  arithmetic written out by hand, over two steps; unit-wise blocks keep heavy ball.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ds_spngd import SPNGD
from ds_spngd.checkpoint import merge_shards
from ds_spngd.config import SPNGDConfigError, parse_spngd_params
from ds_spngd.polar import newton_schulz, polar_scale, polar_update
from tests.optimizer.test_curvature import DAMPING, kron_solve, per_example_grads, per_example_output_grads, with_ones


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (8, 8), (64, 16), (16, 65)])
def test_newton_schulz_is_the_polar_factor_up_to_muons_band(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    y = newton_schulz(x)
    core = u.T @ y @ vh.T  # k × k: diagonal when y = U f(S) Vᵀ
    off = core - torch.diag(torch.diagonal(core))
    assert float(off.abs().max()) < 1e-10
    s = torch.diagonal(core)
    assert float(s.min()) > 0.6 and float(s.max()) < 1.25, s
    torch.testing.assert_close(newton_schulz(x.T), y.T)  # orientation does not matter


def test_gram_form_is_the_same_polynomial() -> None:
    """A wide block (k ≥ 2r) takes the Gram form; it equals Muon's direct iteration written out here (fp64)."""
    torch.manual_seed(4)
    x = torch.randn(6, 40, dtype=torch.float64)
    y = x / (torch.linalg.matrix_norm(x) + 1e-7)
    for _ in range(5):
        gram = y @ y.T
        y = 3.4445 * y + (-4.7750 * gram + 2.0315 * gram @ gram) @ y
    torch.testing.assert_close(newton_schulz(x), y, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(newton_schulz(x.T), y.T, rtol=1e-9, atol=1e-9)


def test_newton_schulz_of_zero_and_rejects_vectors() -> None:
    assert torch.equal(newton_schulz(torch.zeros(3, 4)), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz(torch.zeros(3))


@pytest.mark.parametrize("nesterov", [True, False])
def test_polar_update_momentum_arithmetic(nesterov: bool) -> None:
    torch.manual_seed(1)
    beta, d1, d2 = 0.9, torch.randn(6, 3), torch.randn(6, 3)
    o1, buf = polar_update(d1, None, beta, nesterov, 5)
    n1 = d1 + beta * d1 if nesterov else d1
    torch.testing.assert_close(o1, newton_schulz(n1) * math.sqrt(2.0))
    o2, buf2 = polar_update(d2, buf, beta, nesterov, 5)
    u2 = beta * d1 + d2
    torch.testing.assert_close(buf2, u2)
    torch.testing.assert_close(o2, newton_schulz(d2 + beta * u2 if nesterov else u2) * math.sqrt(2.0))
    assert polar_scale(3, 6) == 1.0


class LNNet(nn.Module):
    """Linear(5→4)+bias → LayerNorm → tanh → Linear(4→3): two Kronecker blocks and a unit-wise block."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.ln, self.fc2 = nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.ln(self.fc1(x))))


def _kfac_direction(model: LNNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """F̂⁻¹g of fc2 as a 3 × 5 matrix ([W | b]), dense fp64 reference."""
    with torch.no_grad():
        h = torch.tanh(model.ln(model.fc1(x)))
    a = with_ones(h.double())
    seq = nn.Sequential(model.fc2)
    g = per_example_output_grads(seq, 0, h, y)
    mean_grad = per_example_grads(seq, "0", h, y).mean(0)
    return kron_solve(g.T @ g / x.shape[0], a.T @ a / x.shape[0], mean_grad, "inverse").reshape(3, 5)


def _delta(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> torch.Tensor:
    dw = after["fc2.weight"] - before["fc2.weight"]
    return torch.cat([dw, (after["fc2.bias"] - before["fc2.bias"]).unsqueeze(-1)], dim=1).double()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_polar_steps_match_dense_kfac_reference() -> None:
    """Two steps (lr 0.1, weight decay 0.01, β 0.9 Nesterov): fc2 moves by −η·(msgn(n_t)·1 + wd·w) with n_t built
    from the dense reference's F̂⁻¹g; the LayerNorm keeps the heavy-ball natural gradient (its momentum buffer
    exists, fc2's does not)."""
    model = LNNet()
    ref = copy.deepcopy(model)
    lr, wd, beta = 0.1, 0.01, 0.9
    opt = SPNGD(model.parameters(), model=model, config={
        "lr": lr, "momentum": 0.5, "weight_decay": wd, "damping": DAMPING, "factor_decay": 0.0,
        "direction": "polar", "polar_momentum": beta, "kl_clip": 1e-3})
    torch.manual_seed(2)
    batches = [(torch.randn(9, 5), torch.randint(0, 3, (9,))) for _ in range(2)]
    buf = None
    for x, y in batches:
        before = _snapshot(model)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        ref.load_state_dict({k: v.clone() for k, v in before.items()})
        p = _kfac_direction(ref, x, y)
        buf = p if buf is None else beta * buf + p
        w = torch.cat([before["fc2.weight"], before["fc2.bias"].unsqueeze(-1)], dim=1).double()
        expected = -lr * (newton_schulz(p + beta * buf) + wd * w)  # 3 × 5 is wide: shape scale 1
        torch.testing.assert_close(_delta(before, _snapshot(model)), expected, rtol=1e-4, atol=1e-6)
    assert "momentum_buffer" in opt.state[model.ln.weight]
    assert "momentum_buffer" not in opt.state[model.fc2.weight]
    shard = opt.spngd_state()
    assert torch.equal(shard["blocks"]["fc2"]["direction_momentum"], next(
        b for b in opt.blocks if b.name == "fc2").direction_momentum)


def test_checkpoint_merge_keeps_the_owners_polar_momentum() -> None:
    """mem_opt: only the block owner's shard holds the polar momentum; the merged state keeps it."""
    held = torch.ones(2, 3)
    shards = [{"steps": 4, "blocks": {"fc": {"ready": True, "direction_momentum": None}}},
              {"steps": 4, "blocks": {"fc": {"ready": True, "direction_momentum": held}}}]
    _, merged = merge_shards(shards, ["fc"])
    assert merged["fc"]["direction_momentum"] is held


def test_polar_resume_restores_the_momentum() -> None:
    """state_dict after 2 steps → a fresh model and optimizer → the same 3rd step as the uninterrupted run."""
    torch.manual_seed(3)
    data = [(torch.randn(9, 5), torch.randint(0, 3, (9,))) for _ in range(3)]
    cfg = {"lr": 0.1, "momentum": 0.5, "damping": DAMPING, "direction": "polar"}

    def step(model: LNNet, opt: SPNGD, x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    m1 = LNNet()
    o1 = SPNGD(m1.parameters(), model=m1, config=cfg)
    for x, y in data[:2]:
        step(m1, o1, x, y)
    saved, weights = copy.deepcopy(o1.state_dict()), _snapshot(m1)
    step(m1, o1, *data[2])
    m2 = LNNet()
    m2.load_state_dict(weights)
    o2 = SPNGD(m2.parameters(), model=m2, config=cfg)
    o2.load_state_dict(saved)
    step(m2, o2, *data[2])
    torch.testing.assert_close(_snapshot(m2), _snapshot(m1))


def test_direction_keys_are_validated() -> None:
    with pytest.raises(SPNGDConfigError, match="optimizer.params.direction"):
        parse_spngd_params({"direction": "orthogonal"})
    with pytest.raises(SPNGDConfigError, match="optimizer.params.polar_momentum"):
        parse_spngd_params({"polar_momentum": 1.0})
    with pytest.raises(SPNGDConfigError, match="optimizer.params.polar_steps"):
        parse_spngd_params({"polar_steps": True})
    assert parse_spngd_params({"direction": "polar"}).polar_momentum == 0.95
