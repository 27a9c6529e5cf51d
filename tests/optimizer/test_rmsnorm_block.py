"""Unit-wise Fisher block of RMSNorm (scale only, k = 1) and of bias-free LayerNorm, against torch.func references.

The models are sequence models: the norm layer sees N × T × d (or N × T × 3 × 4 for a 2-D ``normalized_shape``),
so the per-example gradient of γ_c sums over the T positions. References never use the library's code: per-example
gradients ∂ℓ_i/∂γ come from ``vmap(grad(ℓ_i))`` through ``functional_call`` of the model itself (so x̂ and eps are
torch's own), F_c = mean_i (∂ℓ_i/∂γ_c)², and the expected step is −(F_c + λ)⁻¹ g_c elementwise in fp64.

Inputs are scaled so that mean(x²) is comparable to eps: a block using another eps than the layer fails the tests.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ds_spngd import SPNGD
from ds_spngd.curvature.base import CaptureContext
from ds_spngd.curvature.unit_wise import UnitWiseBlock, unit_wise_supported
from tests.support.harness import spngd_one_step

DAMPING = 1e-3
N, T, D = 6, 5, 4
CLASSES = 3
FP32_EPS = torch.finfo(torch.float32).eps


def norm_model(norm: nn.Module, feat_shape: tuple[int, ...], seed: int = 0,
               dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """norm → tanh → flatten → frozen Linear head (only the norm layer is preconditioned).

    Args:
        norm: the norm layer; its weight is drawn from U(0.5, 1.5) (its bias, if any, from U(-0.5, 0.5)).
        feat_shape: the per-example input shape (T × normalized_shape).
    """
    torch.manual_seed(seed)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.uniform_(-0.5, 0.5)
    head = nn.Linear(int(torch.Size(feat_shape).numel()), CLASSES)
    head.requires_grad_(False)
    return nn.Sequential(norm, nn.Tanh(), nn.Flatten(), head).to(dtype)


def per_example_norm_grads(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"weight": N × U, "bias": N × U (if any)}: ∂ℓ_i/∂γ (and β) of model[0], ℓ_i = CE(model(x_i), y_i), fp64."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**params, **p}, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    sub = {k: v for k, v in params.items() if k.startswith("0.")}
    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(sub, x, y)
    return {k[2:]: v.reshape(x.shape[0], -1).double() for k, v in g.items()}


def unit_reference(pe: dict[str, torch.Tensor], reduction: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(F: U × k × k, training gradient: U × k, expected step −(F + λI)⁻¹ g: U × k) from per-example gradients."""
    u = torch.stack([pe["weight"]] + ([pe["bias"]] if "bias" in pe else []), dim=-1)  # N × U × k
    f = torch.einsum("nui,nuj->uij", u, u) / u.shape[0]
    g = u.mean(0) if reduction == "mean" else u.sum(0)
    eye = torch.eye(u.shape[-1], dtype=torch.float64)
    step = -torch.linalg.solve(f + DAMPING * eye, g.unsqueeze(-1)).squeeze(-1)
    return f, g, step


def run_one_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str,
                 **cfg: object) -> tuple[SPNGD, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One SP-NGD step with lr=1, no momentum, single process: (optimizer, params before, params after)."""
    return spngd_one_step(model, lambda m: F.cross_entropy(m(x), y, reduction=reduction), DAMPING,
                          loss_reduction=reduction, **cfg)


def mc_labels(model: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    """Replays the optimizer's label sampling: same seed, same softmax, one multinomial draw."""
    with torch.no_grad():
        logits = model(x).float()
    torch.manual_seed(seed)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1).squeeze(1)


def unit_block(opt: SPNGD) -> UnitWiseBlock:
    b = next(b for b in opt.blocks if b.name == "0")
    assert isinstance(b, UnitWiseBlock)
    return b


# (module factory, per-example input shape, input scale): the scale makes mean(x²) ≈ eps for the eps under test
CASES = {
    "rms_eps_none": (lambda: nn.RMSNorm(D), (T, D), 3e-4),  # mean(x²) ≈ 1e-7 ≈ fp32 eps
    "rms_eps_explicit": (lambda: nn.RMSNorm(D, eps=1e-2), (T, D), 0.1),
    "rms_2d_shape": (lambda: nn.RMSNorm([3, 4], eps=1e-3), (T, 3, 4), 0.03),
    "layernorm_no_bias": (lambda: nn.LayerNorm(D, bias=False, eps=1e-3), (T, D), 0.03),
    "layernorm_bias": (lambda: nn.LayerNorm(D, eps=1e-3), (T, D), 0.03),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", list(CASES))
def test_unit_wise_block_matches_torch_func(case: str, reduction: str) -> None:
    make, feat, scale = CASES[case]
    norm = make()
    model = norm_model(norm, feat, seed=1)
    torch.manual_seed(2)
    x, y = torch.randn(N, *feat) * scale, torch.randint(0, CLASSES, (N,))
    ref = copy.deepcopy(model)
    opt, before, after = run_one_step(model, x, y, reduction)

    b = unit_block(opt)
    k = 2 if getattr(norm, "bias", None) is not None else 1
    assert (b.units, b.k) == (norm.weight.numel(), k)
    assert b.describe() == f"0: {type(norm).__name__} unit-wise, {norm.weight.numel()} blocks of {k}x{k}"

    pe = per_example_norm_grads(ref, x, y)
    f_ref, _, step = unit_reference(pe, reduction)
    assert f_ref.abs().max() > 3 * DAMPING  # the curvature, not the damping, shapes the step
    torch.testing.assert_close(b.f.value.double(), f_ref, rtol=1e-4, atol=1e-7)
    got = [(after["0.weight"] - before["0.weight"]).reshape(-1)]
    if k == 2:
        got.append((after["0.bias"] - before["0.bias"]).reshape(-1))
    torch.testing.assert_close(torch.stack(got, -1).double(), step, rtol=2e-4, atol=1e-6)


def test_rmsnorm_step_is_elementwise_division() -> None:
    """k = 1: the update is −g_c / (F_c + λ) with F_c = mean_i (∂ℓ_i/∂γ_c)² (no coupling between units)."""
    model = norm_model(nn.RMSNorm(D), (T, D), seed=3)
    torch.manual_seed(4)
    x, y = torch.randn(N, T, D) * 3e-4, torch.randint(0, CLASSES, (N,))
    ref = copy.deepcopy(model)
    opt, before, after = run_one_step(model, x, y, "mean")
    gam = per_example_norm_grads(ref, x, y)["weight"]  # N × D
    f_c = (gam**2).mean(0)
    torch.testing.assert_close(unit_block(opt).f.value.double().reshape(-1), f_c, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close((after["0.weight"] - before["0.weight"]).double(), -gam.mean(0) / (f_c + DAMPING),
                               rtol=2e-4, atol=1e-7)


def test_rmsnorm_mc_fisher() -> None:
    model = norm_model(nn.RMSNorm(D, eps=1e-2), (T, D), seed=5)
    torch.manual_seed(6)
    x, y = torch.randn(N, T, D) * 0.1, torch.randint(0, CLASSES, (N,))
    ref = copy.deepcopy(model)
    seed = 99
    torch.manual_seed(seed)  # the MC hook draws labels right after the forward pass
    opt, before, after = run_one_step(model, x, y, "mean", fisher_type="mc")
    f_ref, _, _ = unit_reference(per_example_norm_grads(ref, x, mc_labels(ref, x, seed)), "mean")
    torch.testing.assert_close(unit_block(opt).f.value.double(), f_ref, rtol=1e-4, atol=1e-7)
    g = per_example_norm_grads(ref, x, y)["weight"].mean(0)
    torch.testing.assert_close((after["0.weight"] - before["0.weight"]).double(),
                               -g / (f_ref[:, 0, 0] + DAMPING), rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("eps", [None, 1e-12])
def test_rmsnorm_fp64_block_uses_layer_eps(eps: float | None) -> None:
    """fp64 input, eps=None: torch uses finfo(float64).eps (not float32's); the block built directly follows it.

    mean(x²) ≈ 1e-16 here, so an fp32 eps (1.2e-7) would change x̂ by orders of magnitude.
    """
    model = norm_model(nn.RMSNorm(D, eps=eps), (T, D), seed=7, dtype=torch.float64)
    torch.manual_seed(8)
    x, y = torch.randn(N, T, D, dtype=torch.float64) * 1e-8, torch.randint(0, CLASSES, (N,))
    f_ref, _, _ = unit_reference(per_example_norm_grads(model, x, y), "sum")  # before the hook is registered
    ctx = CaptureContext(loss_reduction="sum")
    blk = UnitWiseBlock("0", model[0], ctx)
    blk.register()
    F.cross_entropy(model(x), y, reduction="sum").backward()
    assert blk.fired
    total, count = blk.f.take_local()
    assert count == N
    torch.testing.assert_close(total.double() / count, f_ref, rtol=1e-4, atol=1e-9)
    blk.remove()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("eps", [None, 1e-3])
def test_rmsnorm_normalized_input(dtype: torch.dtype, eps: float | None) -> None:
    """x̂ = x / sqrt(mean(x²) + eps), eps=None → machine epsilon of the opmath type (fp32 for bf16), in fp32."""
    norm = nn.RMSNorm([2, D], eps=eps).to(dtype)
    blk = UnitWiseBlock("n", norm, CaptureContext())
    torch.manual_seed(9)
    x = (torch.randn(N, T, 2, D, dtype=torch.float64) * 1e-3).to(dtype)
    xd = x.double()
    e = eps if eps is not None else torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    expected = xd / torch.sqrt(xd.pow(2).mean(dim=(-2, -1), keepdim=True) + e)
    got = blk.normalized_input(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # and γ·x̂ is the layer's own output (bf16: up to its rounding)
        norm.weight.uniform_(0.5, 1.5)
        tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close((got * norm.weight.float()).double(), norm(x).double(), **tol)


def test_non_affine_norms_fall_back() -> None:
    for mod in (nn.RMSNorm(D, elementwise_affine=False), nn.LayerNorm(D, elementwise_affine=False)):
        reason = unit_wise_supported(mod)
        assert reason == f"{type(mod).__name__} without elementwise_affine"
        with pytest.raises(ValueError, match="without elementwise_affine"):
            UnitWiseBlock("n", mod, CaptureContext())
    assert unit_wise_supported(nn.RMSNorm(D)) is None
    assert unit_wise_supported(nn.LayerNorm(D, bias=False)) is None


def test_registry_builds_rmsnorm_block() -> None:
    """build_blocks (via SPNGD) gives the RMSNorm a unit-wise block; a non-affine one has no parameters to report."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(D, D), nn.RMSNorm(D), nn.RMSNorm(D, elementwise_affine=False), nn.Linear(D, 2))
    opt = SPNGD(model.parameters(), model=model, config={})
    kinds = {b.name: b.kind for b in opt.blocks}
    assert kinds == {"0": "kronecker", "1": "unit_wise", "3": "kronecker"}
    opt.remove_hooks()
