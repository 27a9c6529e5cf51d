"""Sequence (N × T) Fisher blocks against independent dense references.

References never use the library's code paths:

* per-position output gradients ĝ_{n,t} = ∂(Σ_t' ℓ_{n,t'})/∂s_{n,t} come from ``torch.func`` (``grad`` of the
  per-sequence *sum* of token losses w.r.t. an additive perturbation of the layer output, ``vmap`` over sequences)
  on a hand-written fp64 functional copy of the model;
* the positions that reach a loss term are read off the labels (``ignore_index`` = -100; through the causal mixing
  layer a position is live when any label at or after it is kept) and checked against the zero rows of ĝ;
* factors follow the docstring conventions (expand: A = (1/P) Σ_{live n,t} a aᵀ, G = (1/M) Σ ĝ ĝᵀ; reduce:
  A = (1/N') Σ_n ā_n ā_nᵀ, G = (1/M) Σ_n (Σ_t ĝ)(Σ_t ĝ)ᵀ; LayerNorm: (1/M) Σ_n u_n u_nᵀ), the embedding's input
  factor is a token histogram, the MC labels are re-drawn with the optimizer's seed, and the update is the dense
  fp64 ``torch.linalg.solve`` of the damped ``torch.kron`` matrix.

Equivalences checked between modules: nn.Embedding ≡ nn.Linear on one-hot rows, HF Conv1D ≡ nn.Linear with the
transposed weight, and expand's per-token factors are the same whatever the sequence length the data is cut into.

Most models return a copy of the head's logits (:class:`OutputCopy`); :func:`test_head_output_is_the_model_output`
covers the usual layout where the logits are the head Linear's own output (its block counts the loss terms itself).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

from ds_spngd import SPNGD
from tests.support.harness import block_named as block
from tests.support.harness import spngd_one_step

DAMPING = 3e-2
IGNORE = -100
N, T, D_IN, HID, V = 5, 6, 5, 6, 7
F64 = torch.float64


# ---------------------------------------------------------------------------------------------------------------
# models and data
# ---------------------------------------------------------------------------------------------------------------
def causal_mean(h: Tensor) -> Tensor:
    """h_t ← mean_{s ≤ t} h_s over the position dimension (-2): mixes positions causally."""
    t = h.shape[-2]
    return h.cumsum(-2) / torch.arange(1, t + 1, dtype=h.dtype, device=h.device).unsqueeze(-1)


class CausalMean(nn.Module):
    """Parameter-free causal mixing: an ignored middle label still sends gradient to earlier layers."""

    def forward(self, h: Tensor) -> Tensor:
        return causal_mean(h)


class OutputCopy(nn.Module):
    """Returns a copy of the logits, so that the model's output is not the head layer's own output tensor.

    Without it the head block's gradient hook runs before the loss-term count (see
    :func:`test_head_output_is_the_model_output`, a known bug); with it every other convention is tested."""

    def forward(self, logits: Tensor) -> Tensor:
        return logits.clone()


def seq_model(seed: int = 0, copy_output: bool = True) -> nn.Sequential:
    """Linear → LayerNorm → tanh → causal mean → Linear to V logits per position (→ output copy)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D_IN, HID), nn.LayerNorm(HID), nn.Tanh(), CausalMean(), nn.Linear(HID, V))
    if copy_output:
        model.append(OutputCopy())
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.3, 0.3)
    return model


def seq_forward(p: dict[str, Tensor], x: Tensor, d0: Tensor | float = 0.0,
                d4: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
    """Hand-written functional copy of :func:`seq_model` with additive perturbations of both Linear outputs.

    Returns (logits, the head's input h)."""
    s0 = x @ p["0.weight"].T + p["0.bias"] + d0
    h = causal_mean(torch.tanh(F.layer_norm(s0, (HID,), p["1.weight"], p["1.bias"], eps=1e-5)))
    return h @ p["4.weight"].T + p["4.bias"] + d4, h


def lm_labels(seed: int, n: int = N, t: int = T, vocab: int = V) -> Tensor:
    """Labels with ignored tokens: trailing spans (dead at every layer), a middle one, a fully ignored sequence."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, vocab, (n, t), generator=gen)
    y[0, 4:] = IGNORE  # trailing span: positions 4, 5 reach no loss term anywhere
    y[1, 2] = IGNORE  # middle: the head is masked at (1, 2), layers before the causal mixing are not
    y[2, 1] = IGNORE
    y[2, 3:] = IGNORE
    if n > 4:
        y[4, :] = IGNORE  # no loss term at all: N' < N for reduce
    return y


def lm_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE)


def live_through_mixing(y: Tensor) -> Tensor:
    """N × T bool: positions with a kept label at or after them (what reaches a loss term through causal mixing)."""
    kept = y != IGNORE
    return torch.stack([kept[:, t:].any(1) for t in range(y.shape[1])], dim=1)


def params64(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to(F64) for k, v in model.named_parameters()}


def with_ones(a: Tensor) -> Tensor:
    return torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------------------------
def expand_ref(a: Tensor, g: Tensor, live: Tensor, terms: float) -> tuple[Tensor, Tensor]:
    """A = (1/P) Σ_{live n,t} a aᵀ, G = (1/M) Σ_{n,t} ĝ ĝᵀ."""
    al = a[live]
    gf = g.reshape(-1, g.shape[-1])
    return al.T @ al / live.sum(), gf.T @ gf / terms


def reduce_ref(a: Tensor, g: Tensor, live: Tensor, terms: float) -> tuple[Tensor, Tensor]:
    """A = (1/N') Σ_n ā_n ā_nᵀ (ā_n: mean of a over n's live positions), G = (1/M) Σ_n (Σ_t ĝ)(Σ_t ĝ)ᵀ."""
    cnt = live.sum(1)
    keep = cnt > 0
    abar = (a * live.unsqueeze(-1)).sum(1)[keep] / cnt[keep].unsqueeze(-1).to(a.dtype)
    gs = g.sum(1)
    return abar.T @ abar / keep.sum(), gs.T @ gs / terms


def seq_refs(model: nn.Module, x: Tensor, y_fisher: Tensor, y_train: Tensor, approx: str, mc: bool = False,
             first: int | None = None) -> dict[str, Tensor]:
    """Reference factors of :func:`seq_model` ("0.A", "0.G", "4.A", "4.G", "1.F") and the training gradient.

    Args:
        y_fisher: the labels of the Fisher (training labels, or the MC draws).
        y_train: the training labels (the gradient is that of their mean loss).
        mc: every position is a loss term (MC Fisher: summed loss over sampled labels).
        first: only the first ``first`` sequences enter the factors (factor_sample_fraction).
    """
    p = params64(model)
    x64 = x.to(F64)
    n, t = y_fisher.shape

    def seq_loss(p_: dict[str, Tensor], xi: Tensor, yi: Tensor, d0: Tensor, d4: Tensor) -> Tensor:
        return F.cross_entropy(seq_forward(p_, xi, d0, d4)[0], yi, ignore_index=IGNORE, reduction="sum")

    zeros0, zeros4 = torch.zeros(n, t, HID, dtype=F64), torch.zeros(n, t, V, dtype=F64)
    per_seq = vmap(grad(seq_loss, argnums=(0, 3, 4)), in_dims=(None, 0, 0, 0, 0))
    gp, g0, g4 = per_seq(p, x64, y_fisher, zeros0, zeros4)
    _, h = seq_forward(p, x64)
    kept = y_fisher != IGNORE
    live4, live0 = kept, live_through_mixing(y_fisher)
    # the label-derived masks are exactly the zero rows of ĝ (sanity of the reference itself)
    assert torch.equal(g4.abs().amax(-1) > 0, live4)
    assert torch.equal(g0.abs().amax(-1) > 0, live0)
    u = torch.stack([gp["1.weight"], gp["1.bias"]], dim=-1)  # N × HID × 2: per-sequence LayerNorm gradients
    m = first if first is not None else n
    a0, a4 = with_ones(x64)[:m], with_ones(h)[:m]
    g0, g4, live0, live4, u = g0[:m], g4[:m], live0[:m], live4[:m], u[:m]
    terms = float(m * t) if mc else float(kept[:m].sum())
    fn = expand_ref if approx == "expand" else reduce_ref
    out: dict[str, Tensor] = {}
    out["0.A"], out["0.G"] = fn(a0, g0, live0, terms)
    out["4.A"], out["4.G"] = fn(a4, g4, live4, terms)
    out["1.F"] = torch.einsum("nci,ncj->cij", u, u) / terms
    # gradient of the training loss (mean over the kept tokens) by plain autograd on the fp64 copy
    leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
    loss = lm_loss(seq_forward(leaves, x64)[0], y_train)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    out.update({f"grad.{k}": gk for k, gk in zip(leaves, grads, strict=True)})
    return out


def kron_solve(g_fac: Tensor, a_fac: Tensor, grad_vec: Tensor, method: str) -> Tensor:
    """Dense (damped G ⊗ A)⁻¹ vec(∇W), row-major vec, fp64."""
    g64, a64 = g_fac.detach().to(F64), a_fac.detach().to(F64)
    eye_g, eye_a = torch.eye(g64.shape[0], dtype=F64), torch.eye(a64.shape[0], dtype=F64)
    if method == "inverse":
        pi = math.sqrt((torch.trace(a64) / a64.shape[0]) / (torch.trace(g64) / g64.shape[0]))
        sq = math.sqrt(DAMPING)
        mat = torch.kron(g64 + sq / pi * eye_g, a64 + pi * sq * eye_a)
    else:
        mat = torch.kron(g64, a64) + DAMPING * torch.eye(g64.shape[0] * a64.shape[0], dtype=F64)
    return torch.linalg.solve(mat, grad_vec.to(F64))


def wb(grads: dict[str, Tensor], layer: str) -> Tensor:
    """[∇W | ∇b] of a Linear, flattened row-major."""
    return torch.cat([grads[f"{layer}.weight"], grads[f"{layer}.bias"].unsqueeze(-1)], dim=-1).reshape(-1)


# ---------------------------------------------------------------------------------------------------------------
# the optimizer side
# ---------------------------------------------------------------------------------------------------------------
def run_one_step(model: nn.Module, x: Tensor, y: Tensor, seed: int | None = None,
                 **cfg: object) -> tuple[SPNGD, dict[str, Tensor], dict[str, Tensor]]:
    """One SP-NGD step with lr 1, momentum 0, factor_decay 0 on the mean LM loss: (optimizer, before, after)."""
    return spngd_one_step(model, lambda m: lm_loss(m(x), y), DAMPING, seed=seed, **cfg)


def delta(before: dict[str, Tensor], after: dict[str, Tensor], name: str) -> Tensor:
    return (after[name] - before[name]).to(F64)


def linear_delta(before: dict[str, Tensor], after: dict[str, Tensor], layer: str) -> Tensor:
    dw = delta(before, after, f"{layer}.weight")
    return torch.cat([dw, delta(before, after, f"{layer}.bias").unsqueeze(-1)], dim=-1).reshape(-1)


def check_seq_model(opt: SPNGD, before: dict[str, Tensor], after: dict[str, Tensor], ref: dict[str, Tensor],
                    method: str) -> None:
    """Both Linear blocks' factors and updates, and the LayerNorm's unit-wise factor and update."""
    for layer in ("0", "4"):
        b = block(opt, layer)
        torch.testing.assert_close(b.a.value[0].to(F64), ref[f"{layer}.A"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.g.value[0].to(F64), ref[f"{layer}.G"], rtol=1e-5, atol=1e-8)
        expected = -kron_solve(ref[f"{layer}.G"], ref[f"{layer}.A"], wb(ref, f"grad.{layer}"), method)
        torch.testing.assert_close(linear_delta(before, after, layer), expected, rtol=3e-4, atol=1e-6)
    f_ref = ref["1.F"]
    torch.testing.assert_close(block(opt, "1").f.value.to(F64), f_ref, rtol=1e-5, atol=1e-8)
    u_grad = torch.stack([ref["grad.1.weight"], ref["grad.1.bias"]], dim=-1)
    damped = f_ref + DAMPING * torch.eye(2, dtype=F64)
    expected_ln = -torch.linalg.solve(damped, u_grad.unsqueeze(-1)).squeeze(-1)
    got_ln = torch.stack([delta(before, after, "1.weight"), delta(before, after, "1.bias")], dim=-1)
    torch.testing.assert_close(got_ln, expected_ln, rtol=3e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# expand / reduce against torch.func
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["inverse", "eigen"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_expand_and_reduce_match_torch_func(approx: str, method: str) -> None:
    """Factors of both Linears and of the LayerNorm, and the update, with ignored labels: trailing spans (masked
    at every layer), a middle label (masked at the head only) and a sequence without any loss term."""
    model = seq_model(0)
    torch.manual_seed(1)
    x, y = torch.randn(N, T, D_IN), lm_labels(1)
    ref = seq_refs(copy.deepcopy(model), x, y, y, approx)
    with torch.no_grad():  # the functional copy is the model
        torch.testing.assert_close(seq_forward(params64(model), x.to(F64))[0].float(), model(x), rtol=1e-5,
                                   atol=1e-6)
    opt, before, after = run_one_step(model, x, y, kfac_approx=approx, inverse_method=method)
    check_seq_model(opt, before, after, ref, method)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_factor_sample_fraction_takes_leading_sequences(approx: str) -> None:
    """f = 0.5 of 5 sequences → the first 3 (dim 0, not positions); M is counted among them, ĝ is still the
    gradient of each sequence's summed loss (the loss is the mean over all kept tokens)."""
    model = seq_model(2)
    torch.manual_seed(3)
    x, y = torch.randn(N, T, D_IN), lm_labels(3)
    ref = seq_refs(copy.deepcopy(model), x, y, y, approx, first=3)
    opt, _, _ = run_one_step(model, x, y, kfac_approx=approx, factor_sample_fraction=0.5)
    for layer in ("0", "4"):
        b = block(opt, layer)
        torch.testing.assert_close(b.a.value[0].to(F64), ref[f"{layer}.A"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.g.value[0].to(F64), ref[f"{layer}.G"], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(block(opt, "1").f.value.to(F64), ref["1.F"], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method", ["inverse", "eigen"])
def test_mc_fisher_on_sequence_logits(method: str) -> None:
    """fisher_type "mc" on N × T × V logits: one label per position drawn from softmax of the flattened logits
    right after the forward (same seed); summed loss, every position a term (ignored training labels included)."""
    model = seq_model(4)
    torch.manual_seed(5)
    x, y = torch.randn(N, T, D_IN), lm_labels(5)
    ref_model = copy.deepcopy(model)
    seed = 1234
    opt, before, after = run_one_step(model, x, y, seed=seed, fisher_type="mc", inverse_method=method)
    with torch.no_grad():
        logits = ref_model(x).float()
    torch.manual_seed(seed)
    y_mc = torch.multinomial(torch.softmax(logits.reshape(-1, V), dim=-1), 1).squeeze(1).reshape(N, T)
    ref = seq_refs(ref_model, x, y_mc, y, "expand", mc=True)
    check_seq_model(opt, before, after, ref, method)


def per_token_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HID), nn.Tanh(), nn.Linear(HID, V), OutputCopy())


def test_expand_factors_do_not_depend_on_sequence_length() -> None:
    """A per-token model (no mixing across positions): cutting the same 24 tokens into sequences of T = 6, 3, 2 or
    1 leaves P, M and every ĝ unchanged, so expand's A, G (hence A ⊗ G) and the update are the same."""
    torch.manual_seed(6)
    x, y = torch.randn(4, 6, D_IN), lm_labels(6, n=4, t=6)
    results = []
    for t in (6, 3, 2, 1):
        opt, before, after = run_one_step(per_token_model(7), x.reshape(-1, t, D_IN), y.reshape(-1, t))
        facs = [(block(opt, name).a.value[0].to(F64), block(opt, name).g.value[0].to(F64)) for name in ("0", "2")]
        upd = torch.cat([linear_delta(before, after, name) for name in ("0", "2")])
        results.append((facs, upd))
    (facs0, upd0) = results[0]
    for facs, upd in results[1:]:
        for (a, g), (a0, g0) in zip(facs, facs0, strict=True):
            torch.testing.assert_close(a, a0, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(torch.kron(g, a), torch.kron(g0, a0), rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(upd, upd0, rtol=1e-4, atol=1e-7)


def test_head_output_is_the_model_output() -> None:
    """The usual LM layout: logits are the head Linear's own output. Its G must still be (1/M) Σ ĝ ĝᵀ."""
    model = seq_model(0, copy_output=False)
    torch.manual_seed(1)
    x, y = torch.randn(N, T, D_IN), lm_labels(1)
    ref = seq_refs(copy.deepcopy(model), x, y, y, "expand")
    opt, _, _ = run_one_step(model, x, y)
    torch.testing.assert_close(block(opt, "0").g.value[0].to(F64), ref["0.G"], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(block(opt, "4").g.value[0].to(F64), ref["4.G"], rtol=1e-5, atol=1e-8)


def test_flattened_tokens_match_sequences() -> None:
    """The same 24 tokens as N × T × d (T = 6) or as (N·T) × d rows: a per-token model has the same expand factors."""
    torch.manual_seed(6)
    x, y = torch.randn(4, 6, D_IN), lm_labels(6, n=4, t=6)
    opt_s, _, _ = run_one_step(per_token_model(7), x, y)
    opt_f, _, _ = run_one_step(per_token_model(7), x.reshape(-1, D_IN), y.reshape(-1))
    for name in ("0", "2"):
        torch.testing.assert_close(block(opt_f, name).g.value, block(opt_s, name).g.value, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(block(opt_f, name).a.value, block(opt_s, name).a.value, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# Embedding ≡ Linear on one-hot rows
# ---------------------------------------------------------------------------------------------------------------
EMB_V, EMB_D = 9, 4


class TokenLM(nn.Module):
    """Embedding (or Linear on one-hot rows) → causal mean → tanh → Linear head to V logits per position."""

    def __init__(self, one_hot: bool) -> None:
        super().__init__()
        self.one_hot = one_hot
        self.embed: nn.Module = nn.Linear(EMB_V, EMB_D, bias=False) if one_hot else nn.Embedding(EMB_V, EMB_D)
        self.mix = CausalMean()
        self.head = nn.Linear(EMB_D, EMB_V)

    def forward(self, ids: Tensor) -> Tensor:
        e = self.embed(F.one_hot(ids, EMB_V).float()) if self.one_hot else self.embed(ids)
        return self.head(torch.tanh(self.mix(e))).clone()  # a copy: see OutputCopy


def token_data(seed: int) -> tuple[Tensor, Tensor]:
    """ids of tokens 0..6; token 7 only at positions that reach no loss term; token 8 never."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 7, (N, T), generator=gen)
    y = lm_labels(seed, vocab=EMB_V)
    ids[0, 4:] = 7  # the trailing ignored span of sequence 0
    return ids, y


@pytest.mark.parametrize("method", ["inverse", "eigen"])
def test_embedding_equals_linear_on_one_hot_rows(method: str) -> None:
    torch.manual_seed(8)
    emb_model = TokenLM(one_hot=False)
    lin_model = TokenLM(one_hot=True)
    with torch.no_grad():
        lin_model.embed.weight.copy_(emb_model.embed.weight.T)
        lin_model.head.load_state_dict(emb_model.head.state_dict())
    ids, y = token_data(9)
    ref_w = emb_model.embed.weight.detach().to(F64)
    ref_head = {k: v.detach().to(F64) for k, v in emb_model.head.named_parameters()}

    opt_e, before_e, after_e = run_one_step(emb_model, ids, y, inverse_method=method)
    opt_l, before_l, after_l = run_one_step(lin_model, ids, y, inverse_method=method)

    # the two models take the same step
    torch.testing.assert_close(delta(before_e, after_e, "embed.weight"), delta(before_l, after_l, "embed.weight").T,
                               rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(linear_delta(before_e, after_e, "head"), linear_delta(before_l, after_l, "head"),
                               rtol=1e-4, atol=1e-7)

    # independent reference: token histogram over the live positions, ĝ by torch.func
    live = live_through_mixing(y)
    freq = F.one_hot(ids[live], EMB_V).to(F64).sum(0) / live.sum()
    assert freq[7] == 0 and freq[8] == 0  # token 7 sits only at dead positions

    def seq_loss(d: Tensor, ids_i: Tensor, y_i: Tensor) -> Tensor:
        h = torch.tanh(causal_mean(ref_w[ids_i] + d))
        return F.cross_entropy(h @ ref_head["weight"].T + ref_head["bias"], y_i, ignore_index=IGNORE,
                               reduction="sum")

    g_hat = vmap(grad(seq_loss))(torch.zeros(N, T, EMB_D, dtype=F64), ids, y)
    terms = float((y != IGNORE).sum())
    g_ref = g_hat.reshape(-1, EMB_D).T @ g_hat.reshape(-1, EMB_D) / terms
    b_e, b_l = block(opt_e, "embed"), block(opt_l, "embed")
    torch.testing.assert_close(b_e.a.value.reshape(-1).to(F64), freq, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b_l.a.value[0].to(F64), torch.diag(freq), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b_e.g.value[0].to(F64), g_ref, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(b_l.g.value[0].to(F64), g_ref, rtol=1e-5, atol=1e-8)

    leaf = ref_w.clone().requires_grad_()
    logits = torch.tanh(causal_mean(leaf[ids])) @ ref_head["weight"].T + ref_head["bias"]
    (grad_w,) = torch.autograd.grad(lm_loss(logits, y), [leaf])
    expected = -kron_solve(g_ref, torch.diag(freq), grad_w.T.reshape(-1), method).reshape(EMB_D, EMB_V)
    torch.testing.assert_close(delta(before_e, after_e, "embed.weight").T, expected, rtol=3e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face Conv1D ≡ nn.Linear
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["inverse", "eigen"])
def test_hf_conv1d_equals_linear(method: str) -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(10)
    conv_model = nn.Sequential(pytorch_utils.Conv1D(HID, D_IN), nn.Tanh(), CausalMean(), nn.Linear(HID, V))
    with torch.no_grad():
        conv_model[0].weight.normal_(0.0, 0.5)
        conv_model[0].bias.normal_(0.0, 0.1)
    lin_model = nn.Sequential(nn.Linear(D_IN, HID), nn.Tanh(), CausalMean(), nn.Linear(HID, V))
    with torch.no_grad():
        lin_model[0].weight.copy_(conv_model[0].weight.T)
        lin_model[0].bias.copy_(conv_model[0].bias)
        lin_model[3].load_state_dict(conv_model[3].state_dict())
    torch.manual_seed(11)
    x, y = torch.randn(N, T, D_IN), lm_labels(11)
    opt_c, before_c, after_c = run_one_step(conv_model, x, y, inverse_method=method)
    opt_l, before_l, after_l = run_one_step(lin_model, x, y, inverse_method=method)
    assert type(block(opt_c, "0").module).__name__ == "Conv1D"
    for name in ("a", "g"):
        torch.testing.assert_close(getattr(block(opt_c, "0"), name).value, getattr(block(opt_l, "0"), name).value,
                                   rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(delta(before_c, after_c, "0.weight"), delta(before_l, after_l, "0.weight").T,
                               rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(delta(before_c, after_c, "0.bias"), delta(before_l, after_l, "0.bias"),
                               rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(linear_delta(before_c, after_c, "3"), linear_delta(before_l, after_l, "3"),
                               rtol=1e-4, atol=1e-7)
