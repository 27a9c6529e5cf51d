"""Kronecker-factored Fisher blocks for nn.Linear and nn.Conv2d (K-FAC / KFC).

Per layer the Fisher block of vec(W) (row-major, W: d_out × d_in with the bias appended as a last column) is
approximated by F ≈ G ⊗ A with

* Linear (Martens & Grosse 2015, arXiv:1503.05671 eq. 1–3): A = E_i[a_i a_iᵀ], G = E_i[g_i g_iᵀ], a_i the input
  with a homogeneous 1 for the bias, g_i = ∂ℓ_i/∂s_i the per-example gradient w.r.t. the output.
  Inputs with extra dimensions (N × … × d_in, e.g. sequences) are treated like KFC's spatial positions.
* Conv2d (KFC, Grosse & Martens 2016, arXiv:1602.01407 eq. 23–25): a_{i,t} is the im2col patch (c_in·k_h·k_w [+1])
  at output position t ∈ T; A = E_i[Σ_t a_{i,t} a_{i,t}ᵀ] sums over positions and
  G = E_i[(1/|T|) Σ_t g_{i,t} g_{i,t}ᵀ] averages over them. ∇W = Σ_t g_t a_tᵀ.

The preconditioned gradient is (G ⊗ A + damping)⁻¹ vec(∇W) computed as

* ``"inverse"``: (G + (√λ/π)·I)⁻¹ ∇W (A + π√λ·I)⁻¹, π = sqrt((tr A/d_A)/(tr G/d_G)) (Martens & Grosse §6.3);
* ``"eigen"``: Q_G [(Q_Gᵀ ∇W Q_A) ⊘ (d_G d_Aᵀ + λ)] Q_Aᵀ — the exact inverse of G ⊗ A + λ·I (George et al. 2018,
  KAISA's default).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ds_spngd.curvature.base import CaptureContext, FisherBlock, PreconditionerDraft
from ds_spngd.curvature.factor import SymmetricFactor
from ds_spngd.linalg import InverseJob, pi_correction, sym_eigh

__all__ = ["KroneckerBlock", "kronecker_supported"]


def kronecker_supported(module: nn.Module) -> str | None:
    """Return None when the module can be a Kronecker block, else the reason it falls back to the base update."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"Conv2d with groups={module.groups}"
        if module.padding_mode != "zeros":
            return f"Conv2d with padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str):
            return f"Conv2d with padding={module.padding!r}"
        return None
    return f"{type(module).__name__} has no Kronecker block"


class KroneckerBlock(FisherBlock):
    """K-FAC block of an nn.Linear or nn.Conv2d (groups=1, zero padding).

    Factors: ``A`` (d_in [+1] square, d_in = in_features or c_in·k_h·k_w) and ``G`` (d_out square).
    """

    kind = "kronecker"

    unsupported_reason = staticmethod(kronecker_supported)

    def __init__(self, name: str, module: nn.Module, ctx: CaptureContext) -> None:
        super().__init__(name, module, ctx)
        self.is_conv = isinstance(module, nn.Conv2d)
        w = module.weight
        assert isinstance(w, Tensor)
        self.d_out = int(w.shape[0])
        self.has_bias = getattr(module, "bias", None) is not None
        d_in = int(w[0].numel()) + (1 if self.has_bias else 0)
        self.a = SymmetricFactor(f"{name}.A", d_in, final_in="forward", device=self._param_device)
        self.g = SymmetricFactor(f"{name}.G", self.d_out, device=self._param_device)

    @property
    def factors(self) -> list[SymmetricFactor]:
        return [self.a, self.g]

    def describe(self) -> str:
        kind = "Conv2d (KFC)" if self.is_conv else "Linear"
        return f"{self.name}: {kind} K-FAC, A {self.a.dim}x{self.a.dim}, G {self.g.dim}x{self.g.dim}"

    # ---- statistics -------------------------------------------------------------------------------------------
    def input_rows(self, x: Tensor) -> tuple[Tensor, int]:
        """Rows a_{i,t} of the layer input.

        Args:
            x: Linear: N × … × in_features; Conv2d: N × c_in × H × W.

        Returns:
            (rows, T): (N·T) × d_A (bias coordinate 1 appended), T = positions per example.
        """
        m = self.module
        if self.is_conv:
            assert isinstance(m, nn.Conv2d)
            patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)  # type: ignore[arg-type]
            t = patches.shape[-1]
            rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        else:
            rows = x.reshape(-1, x.shape[-1])
            t = rows.shape[0] // max(int(x.shape[0]), 1)
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows, t

    def output_rows(self, gy: Tensor) -> Tensor:
        """Rows g_{i,t} of the output gradient: (N·T) × d_out (Conv2d: N × C × H × W → positions as rows)."""
        if self.is_conv:
            return gy.permute(0, 2, 3, 1).reshape(-1, gy.shape[1])
        return gy.reshape(-1, gy.shape[-1])

    def _capture_forward(self, x: Tensor, m: int) -> Callable[[Tensor, float], None]:
        rows, t = self.input_rows(x[:m])
        n = m
        self.a.add(rows, 1.0, n)  # KFC: A sums over positions

        def on_grad(gy: Tensor, scale: float) -> None:
            self.g.add(self.output_rows(gy), scale * scale / t, n)  # KFC: G averages over positions

        return on_grad

    # ---- preconditioner ---------------------------------------------------------------------------------------
    def draft_preconditioner(self, damping: float, method: str) -> PreconditionerDraft:
        a, g = self.a.value, self.g.value
        if a is None or g is None:
            raise RuntimeError(f"{self.name}: its factors have no value on this rank (only the owner drafts)")
        if method == "inverse":
            pi = pi_correction(a[0], g[0])  # a 0-d tensor: no host sync
            sq = math.sqrt(damping)
            ja, jg = InverseJob.start(a[0], pi * sq), InverseJob.start(g[0], sq / pi)
            return PreconditionerDraft([ja, jg], lambda: [ja.inverse, jg.inverse])
        if method == "eigen":
            d_a, q_a = sym_eigh(a[0], check=False)
            d_g, q_g = sym_eigh(g[0], check=False)
            scale = 1.0 / (d_g.unsqueeze(1) * d_a.unsqueeze(0) + damping)
            return PreconditionerDraft([], lambda: [q_a, q_g, scale])
        raise ValueError(f"unknown inverse_method {method!r}")

    def preconditioner_shapes(self, method: str) -> list[tuple[int, ...]]:
        da, dg = self.a.dim, self.g.dim
        if method == "inverse":
            return [(da, da), (dg, dg)]
        return [(da, da), (dg, dg), (dg, da)]

    def grad_matrix(self, grads: list[Tensor]) -> Tensor:
        """[∇W | ∇b] as a d_out × d_A fp32 matrix."""
        gw = grads[0].float().reshape(self.d_out, -1)
        if self.has_bias:
            gw = torch.cat([gw, grads[1].float().reshape(self.d_out, 1)], dim=1)
        return gw

    def split_matrix(self, v: Tensor, like: list[Tensor]) -> list[Tensor]:
        """Inverse of :meth:`grad_matrix`."""
        if self.has_bias:
            return [v[:, :-1].reshape(like[0].shape), v[:, -1].reshape(like[1].shape)]
        return [v.reshape(like[0].shape)]

    def precondition(self, grads: list[Tensor]) -> list[Tensor]:
        if self._inverse is None:
            raise RuntimeError(f"{self.name}: precondition() before a preconditioner was installed")
        v = self.grad_matrix(grads)
        if self._method == "inverse":
            a_inv, g_inv = self._inverse
            out = g_inv @ v @ a_inv
        else:
            q_a, q_g, scale = self._inverse
            out = q_g @ ((q_g.t() @ v @ q_a) * scale) @ q_a.t()
        return self.split_matrix(out, grads)
