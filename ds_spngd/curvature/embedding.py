"""Kronecker-factored Fisher block of an nn.Embedding with a diagonal input factor.

An embedding is a Linear layer on one-hot rows: s = Wᵀ e_x with W: V × d (V tokens, d features). In the Linear
orientation (d_out = d, d_in = V) its K-FAC block is F ≈ G ⊗ A with

* A = E[e eᵀ] = diag(token frequencies): one-hot rows have no off-diagonal products, so the diagonal is exact for
  one lookup per position (the "embedding" block of tensorflow/kfac, Martens & Grosse 2015 applied to one-hot
  inputs), held as V blocks of 1 × 1 — never a dense V × V matrix;
* G = E[ĝ ĝᵀ] over the output gradients (d × d; blocked beyond ``max_factor_dim``).

Sequences use K-FAC-expand (Eschenhagen et al., NeurIPS 2023, arXiv:2311.00636): every looked-up position is an
example, A = (1/P) Σ_{n,t} e eᵀ over the P positions whose output gradient is not zero, G = (1/M) Σ_{n,t} ĝ ĝᵀ with M
the loss terms. (Reduce would make A a dense V × V matrix of token co-occurrences, so it is not offered.)

The preconditioned gradient in the weight's own V × d layout is (A + π√λ)⁻¹ ∇W (G + √λ/π)⁻¹ — rare tokens get the
largest steps, each row scaled by the inverse of its damped frequency.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ds_spngd.curvature.base import Capture, CaptureContext, FisherBlock
from ds_spngd.curvature.factor import SymmetricFactor
from ds_spngd.curvature.kronecker import DEFAULT_MAX_FACTOR_DIM, KroneckerBlock
from ds_spngd.curvature.side import Side, side_factor

__all__ = ["EmbeddingBlock", "embedding_supported", "add_lookups", "lookup_capture"]


def embedding_supported(module: nn.Module) -> str | None:
    """Return None when the module can be an embedding block, else the reason it falls back to the base update."""
    if not isinstance(module, nn.Embedding):
        return f"{type(module).__name__} has no embedding block"
    if module.sparse:
        return "nn.Embedding(sparse=True): sparse gradients are not supported"
    return None


def token_factor(name: str, vocab: int, device: Callable[[], torch.device]) -> SymmetricFactor:
    """The diagonal token-frequency factor of a vocabulary of ``vocab`` entries (V blocks of 1 × 1)."""
    return SymmetricFactor(name, 1, blocks=vocab, final_in="backward", device=device, size=vocab)


def add_lookups(counts: Side, g: Side, idx: Tensor, gy: Tensor, scale: float | Tensor,
                terms: float | Tensor) -> None:
    """Add one micro-batch of lookups to an embedding's factors (expand; see the module docstring).

    Args:
        counts: the diagonal token factor (V entries).
        g: the output-side factor (d).
        idx: m × … token indices (int).
        gy: m × … × d output gradient of the same lookups, as seen by the hook.
        scale: per-term scale s (ĝ = s·gy).
        terms: M, the loss terms behind these examples.
    """
    rows = gy.reshape(-1, gy.shape[-1])
    mask = (rows.detach().abs().amax(dim=-1) > 0).to(torch.float32)  # positions that reach a loss term
    freq = torch.zeros(counts.size, dtype=torch.float32, device=rows.device)
    freq.index_add_(0, idx.reshape(-1).to(device=rows.device, dtype=torch.long), mask)
    counts.add_diagonal(freq, mask.sum())
    g.add(g.cast(rows) * scale, 1.0, terms)


def lookup_capture(ctx: CaptureContext, counts: Side, g: Side) -> Capture:
    """The hook capture of an embedding use: keeps the first m examples' indices, adds them with their output
    gradient (:func:`add_lookups`) when it arrives."""

    def capture(x: Tensor, m: int) -> Callable[[Tensor, float | Tensor], None]:
        n, idx = int(x.shape[0]), x[:m]

        def on_grad(gy: Tensor, scale: float | Tensor) -> None:
            add_lookups(counts, g, idx, gy, scale, ctx.terms_in(m, n))

        return on_grad

    return capture


class EmbeddingBlock(KroneckerBlock):
    """K-FAC block of an nn.Embedding (see the module docstring).

    Factors: ``A`` (V diagonal entries) and ``G`` (d × d, blocked beyond ``max_factor_dim``).
    """

    kind = "kronecker"

    unsupported_reason = staticmethod(embedding_supported)

    def __init__(self, name: str, module: nn.Module, ctx: CaptureContext,
                 max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM, large_dim_method: str = "block") -> None:
        FisherBlock.__init__(self, name, module, ctx)
        assert isinstance(module, nn.Embedding)
        self.is_conv, self.transposed, self.has_bias = False, True, False  # ∇W (V × d) is read transposed
        self.vocab, self.d_out = int(module.num_embeddings), int(module.embedding_dim)
        self.max_factor_dim, self.large_dim_method = max_factor_dim, large_dim_method
        self.a = token_factor(f"{name}.A", self.vocab, self._param_device)
        self.g = side_factor(f"{name}.G", self.d_out, max_factor_dim, large_dim_method, device=self._param_device)

    def describe(self) -> str:
        return f"{self.name}: Embedding K-FAC, A diagonal {self.vocab}, G {self.g.blocks}x{self.g.dim}x{self.g.dim}"

    def _capture_forward(self, x: Tensor, m: int) -> Callable[[Tensor, float | Tensor], None]:
        return lookup_capture(self.ctx, self.a, self.g)(x, m)
