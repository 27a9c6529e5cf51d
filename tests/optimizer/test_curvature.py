"""Fisher blocks against an independent dense computation.

References never use the library's code paths: per-example gradients come from ``torch.func`` (vmap of grad over
single examples) or, for BatchNorm (whose batch statistics couple examples), from per-example copies of (γ, β);
im2col patches are cut by explicit slicing; the dense Fisher is built with ``torch.kron`` and solved with
``torch.linalg.solve`` in fp64.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ds_spngd import SPNGD
from tests.support.harness import block_named as block
from tests.support.harness import spngd_one_step

torch.set_default_dtype(torch.float32)
DAMPING = 3e-2


# ---------------------------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------------------------
def per_example_grads(model: nn.Module, layer: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """N × P per-example gradients of ℓ_i = CE(model(x_i), y_i) w.r.t. [W | b] of ``layer``, row-major (d_out rows)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = [f"{layer}.weight"] + ([f"{layer}.bias"] if f"{layer}.bias" in params else [])

    def loss_one(p_sub: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**params, **p_sub}, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))({n: params[n] for n in names}, x, y)
    w = g[names[0]].reshape(x.shape[0], params[names[0]].shape[0], -1)
    if len(names) == 2:
        w = torch.cat([w, g[names[1]].unsqueeze(-1)], dim=-1)
    return w.reshape(x.shape[0], -1).double()


def per_example_output_grads(model: nn.Sequential, idx: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∂ℓ_i/∂s_i for the output s of model[idx], per example (N × output shape)."""
    head, tail = model[: idx + 1], model[idx + 1 :]

    def loss_from_out(s: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(tail(s.unsqueeze(0)), yi.unsqueeze(0))

    with torch.no_grad():
        s = head(x)
    return vmap(grad(loss_from_out))(s, y).double()


def im2col_loops(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """N × T × (c_in·k_h·k_w) patches cut by explicit slicing (channel-major, like weight.view(c_out, -1))."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    ph, pw = conv.padding  # type: ignore[misc]
    dh, dw = conv.dilation
    xp = F.pad(x, (pw, pw, ph, ph)).double()
    h_out = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(h_out):
        for j in range(w_out):
            patch = xp[:, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
            rows.append(patch.reshape(x.shape[0], -1))
    return torch.stack(rows, dim=1)


def with_ones(a: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], dim=-1)


def kron_solve(g_fac: torch.Tensor, a_fac: torch.Tensor, grad_vec: torch.Tensor, method: str) -> torch.Tensor:
    """Dense (damped G ⊗ A)⁻¹ vec(∇W), row-major vec, fp64."""
    g64, a64 = g_fac.detach().double(), a_fac.detach().double()
    if method == "inverse":
        pi = math.sqrt((torch.trace(a64) / a64.shape[0]) / (torch.trace(g64) / g64.shape[0]))
        sq = math.sqrt(DAMPING)
        m = torch.kron(g64 + sq / pi * torch.eye(g64.shape[0], dtype=torch.float64),
                       a64 + pi * sq * torch.eye(a64.shape[0], dtype=torch.float64))
    else:
        m = torch.kron(g64, a64) + DAMPING * torch.eye(g64.shape[0] * a64.shape[0], dtype=torch.float64)
    return torch.linalg.solve(m, grad_vec)


def run_one_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **cfg: object) -> tuple[SPNGD, dict, dict]:
    """One SP-NGD step with lr=1, no momentum: returns (optimizer, params before, params after)."""
    return spngd_one_step(model, lambda m: F.cross_entropy(m(x), y), DAMPING, **cfg)


def layer_delta(before: dict, after: dict, layer: str) -> torch.Tensor:
    dw = (after[f"{layer}.weight"] - before[f"{layer}.weight"]).reshape(before[f"{layer}.weight"].shape[0], -1)
    if f"{layer}.bias" in before:
        dw = torch.cat([dw, (after[f"{layer}.bias"] - before[f"{layer}.bias"]).unsqueeze(-1)], dim=-1)
    return dw.reshape(-1).double()


def mc_labels(model: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    """Replays the optimizer's label sampling: same seed, same softmax, one multinomial draw."""
    with torch.no_grad():
        logits = model(x).float()
    torch.manual_seed(seed)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1).squeeze(1)


# ---------------------------------------------------------------------------------------------------------------
# Linear / Conv2d
# ---------------------------------------------------------------------------------------------------------------
def linear_model(bias: bool) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3))


def conv_model(stride: int, padding: int, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=stride, padding=padding, bias=bias)
    with torch.no_grad():
        t = conv(torch.zeros(1, 2, 6, 6)).numel()
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(t, 3))


@pytest.mark.parametrize("fisher_type", ["emp", "mc"])
@pytest.mark.parametrize("method", ["inverse", "eigen"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_block_matches_dense(bias: bool, method: str, fisher_type: str) -> None:
    model = linear_model(bias)
    torch.manual_seed(1)
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    ref_model = copy.deepcopy(model)
    seed = 123
    torch.manual_seed(seed)  # the MC hook draws labels right after the forward pass
    opt, before, after = run_one_step(model, x, y, inverse_method=method, fisher_type=fisher_type)

    a_rows = x.double() if not bias else with_ones(x.double())
    a_ref = a_rows.T @ a_rows / x.shape[0]
    y_fisher = mc_labels(ref_model, x, seed) if fisher_type == "mc" else y
    g = per_example_output_grads(ref_model, 0, x, y_fisher)
    g_ref = g.T @ g / x.shape[0]
    b = block(opt, "0")
    torch.testing.assert_close(b.a.value[0].double(), a_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.g.value[0].double(), g_ref, rtol=1e-5, atol=1e-8)

    # the per-example gradient is g ⊗ a (layout check against torch.func)
    pe = per_example_grads(ref_model, "0", x, y_fisher)
    torch.testing.assert_close(pe, torch.einsum("no,ni->noi", g, a_rows).reshape(x.shape[0], -1))

    mean_grad = per_example_grads(ref_model, "0", x, y).mean(0)
    expected = -kron_solve(g_ref, a_ref, mean_grad, method)
    torch.testing.assert_close(layer_delta(before, after, "0"), expected, rtol=2e-4, atol=1e-6)


def test_single_example_kronecker_is_exact_fisher() -> None:
    """With one example, G ⊗ A is the exact empirical Fisher J Jᵀ of that example."""
    model = linear_model(True)
    torch.manual_seed(2)
    x, y = torch.randn(1, 5), torch.randint(0, 3, (1,))
    ref = copy.deepcopy(model)
    opt, _, _ = run_one_step(model, x, y)
    b = block(opt, "0")
    j = per_example_grads(ref, "0", x, y)[0]
    torch.testing.assert_close(torch.kron(b.g.value[0].double(), b.a.value[0].double()), torch.outer(j, j),
                               rtol=1e-5, atol=1e-9)


def test_linear_with_sequence_input_expand_and_reduce() -> None:
    """Linear on N × L × d inputs feeding a classifier (one loss term per example), Eschenhagen et al. 2023:
    expand — A averages a aᵀ over the N·L positions, G = (1/N) Σ_{n,l} ĝ ĝᵀ; reduce — A averages ā ā over examples
    (ā the mean over positions), G = (1/N) Σ_n (Σ_l ĝ)(Σ_l ĝ)ᵀ."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 3, 2))
    x, y = torch.randn(5, 6, 4), torch.randint(0, 2, (5,))
    g = per_example_output_grads(copy.deepcopy(model), 0, x, y)  # N × L × 3
    a_rows = with_ones(x.double())  # N × L × 5
    for approx in ("expand", "reduce"):
        opt, _, _ = run_one_step(copy.deepcopy(model), x, y, kfac_approx=approx)
        if approx == "expand":
            a_ref = torch.einsum("nli,nlj->ij", a_rows, a_rows) / (5 * 6)
            g_ref = torch.einsum("nli,nlj->ij", g, g) / 5
        else:
            abar, gsum = a_rows.mean(1), g.sum(1)
            a_ref, g_ref = abar.t() @ abar / 5, gsum.t() @ gsum / 5
        b = block(opt, "0")
        torch.testing.assert_close(b.a.value[0].double(), a_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.g.value[0].double(), g_ref, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("fisher_type", ["emp", "mc"])
@pytest.mark.parametrize("method", ["inverse", "eigen"])
@pytest.mark.parametrize(("stride", "padding", "bias"), [(1, 0, True), (2, 1, True), (1, 1, False)])
def test_conv2d_kfc_matches_dense(stride: int, padding: int, bias: bool, method: str, fisher_type: str) -> None:
    model = conv_model(stride, padding, bias)
    torch.manual_seed(4)
    x, y = torch.randn(6, 2, 6, 6), torch.randint(0, 3, (6,))
    ref = copy.deepcopy(model)
    seed = 321
    torch.manual_seed(seed)
    opt, before, after = run_one_step(model, x, y, inverse_method=method, fisher_type=fisher_type)

    patches = im2col_loops(x, ref[0])  # N × T × D
    if bias:
        patches = with_ones(patches)
    n, t = patches.shape[0], patches.shape[1]
    a_ref = torch.einsum("nti,ntj->ij", patches, patches) / n  # sums over positions
    y_fisher = mc_labels(ref, x, seed) if fisher_type == "mc" else y
    g = per_example_output_grads(ref, 0, x, y_fisher)  # N × C × H × W
    g_rows = g.permute(0, 2, 3, 1).reshape(n, t, -1)
    g_ref = torch.einsum("nti,ntj->ij", g_rows, g_rows) / (n * t)  # averages over positions
    b = block(opt, "0")
    torch.testing.assert_close(b.a.value[0].double(), a_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.g.value[0].double(), g_ref, rtol=1e-5, atol=1e-9)

    # ∇W_i = Σ_t g_t a_tᵀ matches torch.func's per-example weight gradient (patch layout check)
    pe = per_example_grads(ref, "0", x, y_fisher)
    torch.testing.assert_close(pe, torch.einsum("nto,nti->noi", g_rows, patches).reshape(n, -1),
                               rtol=1e-5, atol=1e-7)

    mean_grad = per_example_grads(ref, "0", x, y).mean(0)
    expected = -kron_solve(g_ref, a_ref, mean_grad, method)
    torch.testing.assert_close(layer_delta(before, after, "0"), expected, rtol=3e-4, atol=1e-6)


def test_conv2d_dilation_and_rectangular_kernel() -> None:
    torch.manual_seed(5)
    conv = nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    with torch.no_grad():
        t = conv(torch.zeros(1, 2, 7, 7)).numel()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(t, 2))
    x, y = torch.randn(4, 2, 7, 7), torch.randint(0, 2, (4,))
    ref = copy.deepcopy(model)
    opt, _, _ = run_one_step(model, x, y)
    patches = with_ones(im2col_loops(x, ref[0]))
    a_ref = torch.einsum("nti,ntj->ij", patches, patches) / 4
    torch.testing.assert_close(block(opt, "0").a.value[0].double(), a_ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# unit-wise: BatchNorm2d, BatchNorm1d, LayerNorm
# ---------------------------------------------------------------------------------------------------------------
def unit_solve(u: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Dense block-diagonal solve: u is N × U × k per-example unit gradients, grads U × k mean gradient."""
    f = torch.einsum("nui,nuj->uij", u, u) / u.shape[0]
    k = u.shape[-1]
    dense = torch.block_diag(*[f[c] + DAMPING * torch.eye(k, dtype=torch.float64) for c in range(f.shape[0])])
    return torch.linalg.solve(dense, grads.reshape(-1)).reshape(grads.shape), f


@pytest.mark.parametrize("fisher_type", ["emp", "mc"])
def test_batchnorm2d_unit_wise_matches_dense(fisher_type: str) -> None:
    torch.manual_seed(6)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    head = nn.Linear(3 * 4 * 4, 4)
    head.requires_grad_(False)
    model = nn.Sequential(bn, nn.Tanh(), nn.Flatten(), head)
    x, y = torch.randn(8, 3, 4, 4) * 2 + 1, torch.randint(0, 4, (8,))
    ref = copy.deepcopy(model)
    seed = 77
    torch.manual_seed(seed)
    opt, before, after = run_one_step(model, x, y, fisher_type=fisher_type)

    # reference: x̂ from the batch statistics, per-example copies of (γ, β) give per-example gradients
    xhat = F.batch_norm(x.double(), None, None, training=True, eps=bn.eps)
    tail = copy.deepcopy(ref[1:]).double()

    def unit_grads(labels: torch.Tensor, reduce_mean: bool) -> torch.Tensor:
        gam = ref[0].weight.detach().double().repeat(8, 1).requires_grad_()
        bet = ref[0].bias.detach().double().repeat(8, 1).requires_grad_()
        out = tail(xhat * gam[:, :, None, None] + bet[:, :, None, None])
        F.cross_entropy(out, labels, reduction="mean" if reduce_mean else "sum").backward()
        return torch.stack([gam.grad, bet.grad], dim=-1)  # N × C × 2

    y_fisher = mc_labels(ref, x, seed) if fisher_type == "mc" else y
    u = unit_grads(y_fisher, reduce_mean=False)
    mean_grad = unit_grads(y, reduce_mean=True).sum(0)  # C × 2
    expected, f_ref = unit_solve(u, mean_grad)
    torch.testing.assert_close(block(opt, "0").f.value.double(), f_ref, rtol=1e-4, atol=1e-7)
    got = torch.stack([after["0.weight"] - before["0.weight"], after["0.bias"] - before["0.bias"]], -1).double()
    torch.testing.assert_close(got, -expected, rtol=2e-4, atol=1e-6)


def bn1d_model(seed: int, channels: int, classes: int) -> nn.Sequential:
    """BatchNorm1d → tanh → frozen Linear head: only the BN block is preconditioned."""
    torch.manual_seed(seed)
    head = nn.Linear(channels, classes)
    head.requires_grad_(False)
    return nn.Sequential(nn.BatchNorm1d(channels), nn.Tanh(), head)


def test_batchnorm1d_unit_wise_factor() -> None:
    model = bn1d_model(7, 4, 3)
    bn = model[0]
    x, y = torch.randn(9, 4), torch.randint(0, 3, (9,))
    ref = copy.deepcopy(model)
    opt, _, _ = run_one_step(model, x, y)
    xhat = F.batch_norm(x.double(), None, None, training=True, eps=bn.eps)
    gam = ref[0].weight.detach().double().repeat(9, 1).requires_grad_()
    bet = ref[0].bias.detach().double().repeat(9, 1).requires_grad_()
    F.cross_entropy(ref[2].double()(torch.tanh(xhat * gam + bet)), y, reduction="sum").backward()
    u = torch.stack([gam.grad, bet.grad], dim=-1)
    torch.testing.assert_close(block(opt, "0").f.value.double(), torch.einsum("nui,nuj->uij", u, u) / 9,
                               rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_unit_wise_matches_dense(bias: bool) -> None:
    torch.manual_seed(8)
    ln = nn.LayerNorm(4, bias=bias)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
    head = nn.Linear(3 * 4, 2)
    head.requires_grad_(False)
    model = nn.Sequential(ln, nn.Tanh(), nn.Flatten(), head)
    x, y = torch.randn(6, 3, 4), torch.randint(0, 2, (6,))  # N × L × D: units are the D elements
    ref = copy.deepcopy(model)
    opt, before, after = run_one_step(model, x, y)
    pe = {k: v for k, v in _ln_per_example(ref, x, y).items()}
    u = torch.stack([pe["0.weight"], pe["0.bias"]], -1) if bias else pe["0.weight"].unsqueeze(-1)
    mean_grad = u.mean(0)
    expected, f_ref = unit_solve(u, mean_grad)
    torch.testing.assert_close(block(opt, "0").f.value.double(), f_ref, rtol=1e-4, atol=1e-8)
    got = (after["0.weight"] - before["0.weight"]).double().unsqueeze(-1)
    if bias:
        got = torch.cat([got, (after["0.bias"] - before["0.bias"]).double().unsqueeze(-1)], -1)
    torch.testing.assert_close(got, -expected, rtol=2e-4, atol=1e-6)


def _ln_per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v for k, v in model.named_buffers()}

    def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, ({**params, **p}, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    sub = {k: v for k, v in params.items() if k.startswith("0.")}
    return {k: v.double() for k, v in vmap(grad(loss_one), in_dims=(None, 0, 0))(sub, x, y).items()}


# ---------------------------------------------------------------------------------------------------------------
# micro-batching
# ---------------------------------------------------------------------------------------------------------------
def small_net() -> nn.Sequential:
    torch.manual_seed(9)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 5 * 5, 4))


@pytest.mark.parametrize("method", ["inverse", "eigen"])
def test_gradient_accumulation_matches_one_big_micro_batch(method: str) -> None:
    """gas=2 with half batches (loss/2 each, as DeepSpeed scales it) == one micro-batch of the whole batch.

    BatchNorm is put in eval mode so that its statistics do not depend on how the batch is split.
    """
    torch.manual_seed(10)
    x, y = torch.randn(8, 1, 5, 5), torch.randint(0, 4, (8,))
    cfg = {"lr": 0.5, "momentum": 0.9, "damping": DAMPING, "factor_decay": 0.5, "inverse_method": method}
    results = []
    for gas in (1, 2):
        model = small_net()
        model.train()
        model[1].eval()
        opt = SPNGD(model.parameters(), model=model, config=cfg)
        opt.set_gradient_accumulation_steps(gas)
        for _ in range(3):
            opt.zero_grad()
            for xm, ym in zip(x.chunk(gas), y.chunk(gas), strict=True):
                (F.cross_entropy(model(xm), ym) / gas).backward()
            opt.step()
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    # eigen: fp32 eigh of factors summed in a different order; differences ~1e-5 after 3 momentum steps
    tol = {"inverse": 1e-6, "eigen": 5e-5}[method]
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=tol)


def test_factor_sample_fraction_uses_leading_examples() -> None:
    """f = 0.5 of 7 examples → the first 4: per-example factors of those, G scaled as per-example gradients."""
    model = linear_model(True)
    torch.manual_seed(11)
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    ref = copy.deepcopy(model)
    opt, _, _ = run_one_step(model, x, y, factor_sample_fraction=0.5)
    a_rows = with_ones(x[:4].double())
    g = per_example_output_grads(ref, 0, x, y)[:4]
    b = block(opt, "0")
    torch.testing.assert_close(b.a.value[0].double(), a_rows.T @ a_rows / 4, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.g.value[0].double(), g.T @ g / 4, rtol=1e-5, atol=1e-8)


def test_factor_sample_fraction_batchnorm_uses_full_batch_statistics() -> None:
    model = bn1d_model(12, 3, 2)
    bn = model[0]
    x, y = torch.randn(8, 3) * 3 + 2, torch.randint(0, 2, (8,))
    ref = copy.deepcopy(model)
    opt, _, _ = run_one_step(model, x, y, factor_sample_fraction=0.25)
    xhat = F.batch_norm(x.double(), None, None, training=True, eps=bn.eps)  # statistics of all 8 examples
    gam = ref[0].weight.detach().double().repeat(8, 1).requires_grad_()
    bet = ref[0].bias.detach().double().repeat(8, 1).requires_grad_()
    F.cross_entropy(ref[2].double()(torch.tanh(xhat * gam + bet)), y, reduction="sum").backward()
    u = torch.stack([gam.grad, bet.grad], dim=-1)[:2]
    torch.testing.assert_close(block(opt, "0").f.value.double(), torch.einsum("nui,nuj->uij", u, u) / 2,
                               rtol=1e-4, atol=1e-8)


class _RowSum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(-1)


def test_mc_fisher_rejects_non_logit_outputs() -> None:
    """fisher_type "mc" samples labels from softmax(logits): a model returning one value per example is refused."""
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(4, 6), _RowSum())
    opt = SPNGD(model.parameters(), model=model, config={"fisher_type": "mc"})
    with pytest.raises(ValueError, match=r"logits of shape N x classes or N x \.\.\. x vocab .*got \(5,\)"):
        model(torch.randn(5, 4))
    opt.remove_hooks()
    model(torch.randn(5, 4))  # hooks gone: the model is as it was


def test_mc_backward_leaves_training_gradients_alone() -> None:
    """The sampled-label backward feeds the factors only: p.grad is the training loss's gradient."""
    model = linear_model(True)
    ref = copy.deepcopy(model)
    torch.manual_seed(14)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    SPNGD(model.parameters(), model=model, config={"fisher_type": "mc"})
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(ref(x), y).backward()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
