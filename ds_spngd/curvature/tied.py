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

from ds_spngd.curvature.base import Capture, CaptureContext, Traces
from ds_spngd.curvature.embedding import lookup_capture, token_factor
from ds_spngd.curvature.factor import SymmetricFactor
from ds_spngd.curvature.kronecker import DEFAULT_MAX_FACTOR_DIM, KroneckerBlock
from ds_spngd.curvature.side import ChunkedSide, Side, chunks_of, side_factor, side_trace
from ds_spngd.linalg import pi_from_traces

__all__ = ["TiedBlock", "tied_supported"]


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
        g = self.g
        # the token counts follow the V-side's chunks, so that chunk k of both lives on one owner
        self.e: Side = (ChunkedSide(f"{name}.E", self.d_out, g.blocks, g.dim, device=self._param_device,
                                    diagonal=True) if isinstance(g, ChunkedSide)
                        else token_factor(f"{name}.E", self.d_out, self._param_device))
        self.s: Side = side_factor(f"{name}.S", self.a.size, max_factor_dim, large_dim_method,
                                   device=self._param_device)

    @property
    def factors(self) -> list[SymmetricFactor]:
        return [*chunks_of(self.a), *chunks_of(self.g), *chunks_of(self.e), *chunks_of(self.s)]

    def describe(self) -> str:
        return (f"{self.name}: Linear tied to Embedding {self.emb_name}, one K-FAC block over the shared weight "
                f"(V-side {self.g.blocks}x{self.g.dim}x{self.g.dim} + diagonal {self.e.size}, d-side {self.a.dim})")

    def hooked(self) -> list[tuple[nn.Module, Capture]]:
        return [(self.module, self._capture_forward), (self.embedding, lookup_capture(self.ctx, self.e, self.s))]

    def side_layers(self) -> tuple[tuple[Side, ...], tuple[Side, ...]]:
        """d-side (A_out, G_emb) and V-side (G_out, D_emb), aligned chunk by chunk."""
        return (self.a, self.s), (self.g, self.e)

    def _combined(self) -> bool:
        """True once the embedding use has factors (identical on every rank: versions, not values)."""
        return self.e.committed and self.s.committed

    def _pi_tied(self, traces: Traces) -> Tensor:
        """π_t = sqrt((tr G_out/V · tr G_emb/d) / (tr D_emb/V · tr A_out/d)) (module docstring), 0-d."""
        mean = {k: side_trace(f, traces) / f.size for k, f in (("g", self.g), ("s", self.s), ("e", self.e),
                                                              ("a", self.a))}
        return pi_from_traces(mean["g"] * mean["s"], mean["e"] * mean["a"])

    def combine_parts(self, side: int, values: list[Tensor | None], traces: Traces) -> Tensor:
        """d-side part A_k + G_emb,k / π_t; V-side part G_k + π_t·diag(D_k) (the output use alone until the
        embedding's factors exist)."""
        main, extra = values
        if main is None or (self._combined() and extra is None):
            raise RuntimeError(f"{self.name}: its factors have no value on this rank (only the owner drafts)")
        if not self._combined() or extra is None:
            return main
        pi_t = self._pi_tied(traces)
        if side == 0:
            return main + extra / pi_t
        diag = extra.reshape(-1).float()
        diag = torch.nn.functional.pad(diag, (0, main.shape[0] * main.shape[-1] - diag.numel()))
        out = main.clone()
        out.diagonal(dim1=-2, dim2=-1).add_(diag.view(main.shape[0], main.shape[-1]) * pi_t)
        return out

    def side_mean_traces(self, traces: Traces) -> tuple[Tensor, Tensor]:
        """Mean traces of the combined sides: tr A/d + tr S/(d·π_t) and tr G/V + π_t·tr D/V."""
        mean_a, mean_g = side_trace(self.a, traces) / self.a.size, side_trace(self.g, traces) / self.g.size
        if not self._combined():
            return mean_a, mean_g
        pi_t = self._pi_tied(traces)
        return (mean_a + side_trace(self.s, traces) / self.s.size / pi_t,
                mean_g + pi_t * side_trace(self.e, traces) / self.e.size)

    @property
    def has_factors(self) -> bool:
        """True once the output use's factors exist (the embedding's join when its hooks fire)."""
        return self.a.committed and self.g.committed
