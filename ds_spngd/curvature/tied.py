"""One Fisher block for a weight shared by an nn.Embedding and a bias-free nn.Linear (tied input/output embedding).

The shared W (V × d, the Linear's layout: V outputs, d inputs) receives the sum of two gradients, one per use. Each
use has its own K-FAC block over vec(W) (row-major), both with a V-side factor and a d-side factor:

* output layer (logits = W h): F_out ≈ G_out ⊗ A_out, G_out = E[ĝ ĝᵀ] (V-side, blocked / diagonal beyond
  ``max_factor_dim``), A_out = E[h hᵀ] (d-side);
* embedding (s = Wᵀ e_x): ∇W = e_x ĝ_sᵀ, so F_emb ≈ D_emb ⊗ G_emb with D_emb = diag(token frequencies) (V-side)
  and G_emb = E[ĝ_s ĝ_sᵀ] (d-side) (:mod:`ds_spngd.curvature.embedding`).

The Fisher of the shared weight is approximated by the sum of the two uses' blocks (uses as independent
"positions", the weight-sharing view of Eschenhagen et al., NeurIPS 2023, arXiv:2311.00636, and tensorflow/kfac's
multi-use registration), and the sum of two Kronecker products by one, exactly as factored Tikhonov damping
approximates A ⊗ G + λ I (Martens & Grosse 2015, arXiv:1503.05671 §6.3):

    G_out ⊗ A_out + D_emb ⊗ G_emb  ≈  (G_out + π_t D_emb) ⊗ (A_out + G_emb / π_t),

whose error is the cross terms π_t D_emb ⊗ A_out + G_out ⊗ G_emb / π_t. Their trace, π_t tr D_emb tr A_out +
tr G_out tr G_emb / π_t, is smallest at π_t = sqrt((tr G_out · tr G_emb) / (tr D_emb · tr A_out)) — the same
trace-norm argument as §6.3's π. The combined factors are then damped (π-corrected) and inverted like any K-FAC block,
so the shared weight is preconditioned once: one direction, one momentum buffer, one weight-decay term, one term of
the KL-clip sum, one rescaling.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ds_spngd.curvature.base import Capture, CaptureContext
from ds_spngd.curvature.embedding import lookup_capture, token_factor
from ds_spngd.curvature.factor import SymmetricFactor
from ds_spngd.curvature.kronecker import DEFAULT_MAX_FACTOR_DIM, KroneckerBlock
from ds_spngd.linalg import pi_from_traces

__all__ = ["TiedBlock", "tied_supported", "combine_tied"]


def tied_supported(embedding: nn.Module, linear: nn.Module) -> str | None:
    """None when ``embedding`` and ``linear`` share a weight this block can precondition, else why not."""
    if not isinstance(embedding, nn.Embedding) or not isinstance(linear, nn.Linear):
        return "only an nn.Embedding tied to an nn.Linear output layer is supported"
    if embedding.weight is not linear.weight:
        return "the two modules do not share their weight"
    if linear.bias is not None:
        return "the tied output layer has a bias (a tied output layer without bias is supported)"
    if embedding.sparse:
        return "nn.Embedding(sparse=True): sparse gradients are not supported"
    return None


def combine_tied(g_out: Tensor, a_out: Tensor, counts: Tensor, g_emb: Tensor, v_side: SymmetricFactor,
                 d_side: SymmetricFactor) -> tuple[Tensor, Tensor]:
    """(V-side, d-side) factors of the tied block: (G_out + π_t D_emb, A_out + G_emb / π_t) (module docstring).

    Args:
        g_out: V-side factor of the output use, in ``v_side``'s layout (B × b × b).
        a_out: d-side factor of the output use, in ``d_side``'s layout.
        counts: token frequencies, V × 1 × 1.
        g_emb: d-side factor of the embedding use, in ``d_side``'s layout.
        v_side, d_side: the layouts (for traces over real coordinates and padding).

    Returns:
        The combined factors (new tensors), π_t as a 0-d tensor computed without a host sync.
    """
    freq = counts.reshape(-1).float()
    pi = pi_from_traces(v_side.mean_trace(g_out) * d_side.mean_trace(g_emb),
                        freq.mean() * d_side.mean_trace(a_out))
    diag = torch.nn.functional.pad(freq, (0, v_side.padded - v_side.size)) * pi
    v = g_out.clone()
    v.diagonal(dim1=-2, dim2=-1).add_(diag.view(v_side.blocks, v_side.dim))
    return v, a_out + g_emb / pi


class TiedBlock(KroneckerBlock):
    """The K-FAC block of a weight shared by an Embedding and a bias-free Linear output layer (module docstring).

    Args:
        name: the block's name (the output layer's module name).
        module: the nn.Linear output layer (its weight is the shared parameter).
        embedding: the nn.Embedding whose weight is the same tensor.
        ctx, max_factor_dim, large_dim_method: as :class:`KroneckerBlock`.

    Factors: ``A`` (d-side, output use), ``G`` (V-side, output use), ``E`` (V token frequencies, embedding use),
    ``S`` (d-side, embedding use). Hooks on both modules.

    Raises:
        ValueError: the pair is not supported (:func:`tied_supported`).
    """

    def __init__(self, name: str, module: nn.Module, embedding: nn.Module, ctx: CaptureContext,
                 emb_name: str = "embedding", max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM,
                 large_dim_method: str = "block") -> None:
        reason = tied_supported(embedding, module)
        if reason is not None:
            raise ValueError(f"{name}: {reason}")
        super().__init__(name, module, ctx, max_factor_dim, large_dim_method)
        self.embedding, self.emb_name = embedding, emb_name
        self.e = token_factor(f"{name}.E", self.d_out, self._param_device)
        self.s = SymmetricFactor.for_side(f"{name}.S", self.a.size, max_factor_dim, large_dim_method,
                                          device=self._param_device)

    @property
    def factors(self) -> list[SymmetricFactor]:
        return [self.a, self.g, self.e, self.s]

    def describe(self) -> str:
        return (f"{self.name}: Linear tied to Embedding {self.emb_name}, one K-FAC block over the shared weight "
                f"(V-side {self.g.blocks}x{self.g.dim}x{self.g.dim} + diagonal {self.e.size}, d-side {self.a.dim})")

    def hooked(self) -> list[tuple[nn.Module, Capture]]:
        return [(self.module, self._capture_forward), (self.embedding, lookup_capture(self.ctx, self.e, self.s))]

    def side_values(self) -> tuple[Tensor, Tensor]:
        a, g, e, s = self.a.value, self.g.value, self.e.value, self.s.value
        if a is None or g is None:
            raise RuntimeError(f"{self.name}: its factors have no value on this rank (only the owner drafts)")
        if e is None or s is None:  # the embedding never ran: the output use alone
            return a, g
        v_side, d_side = combine_tied(g, a, e, s, self.g, self.a)
        return d_side, v_side

    @property
    def has_factors(self) -> bool:
        """True once the output use's factors exist (the embedding's join when its hooks fire)."""
        return self.a.committed and self.g.committed
