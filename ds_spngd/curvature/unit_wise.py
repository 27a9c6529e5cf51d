"""Unit-wise Fisher blocks for BatchNorm1d/2d and LayerNorm (Osawa et al. TPAMI 2020, arXiv:2002.06015 §4.2).

Each unit c (a BatchNorm channel or a LayerNorm element) has its own (γ_c, β_c). The Fisher is approximated as
block-diagonal over units with one k × k block per unit (k = 2, or 1 without a bias):

    F_c = E_i[u_{i,c} u_{i,c}ᵀ],  u_{i,c} = (Σ_r g_{i,c,r} x̂_{i,c,r},  Σ_r g_{i,c,r})

where g = ∂ℓ_i/∂y is the per-example output gradient, x̂ the normalized input and r runs over the unit's other
positions (spatial positions for BatchNorm2d, sequence positions for LayerNorm). The preconditioned gradient is
(F_c + λ·I)⁻¹ (∂L/∂γ_c, ∂L/∂β_c), inverted in closed form.

x̂ is recomputed from the input in the forward hook: batch statistics in training mode (biased variance, as
BatchNorm normalizes), running statistics otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ds_spngd.curvature.base import CaptureContext, FisherBlock, PreconditionerDraft
from ds_spngd.curvature.factor import SymmetricFactor
from ds_spngd.linalg import damped_inverse_small

__all__ = ["UnitWiseBlock", "unit_wise_supported"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def unit_wise_supported(module: nn.Module) -> str | None:
    """Return None when the module can be a unit-wise block, else the reason it falls back to the base update."""
    if isinstance(module, _BN):
        return None if module.affine else f"{type(module).__name__} without affine parameters"
    if isinstance(module, nn.LayerNorm):
        return None if module.elementwise_affine else "LayerNorm without elementwise_affine"
    return f"{type(module).__name__} has no unit-wise block"


class UnitWiseBlock(FisherBlock):
    """Unit-wise block of a BatchNorm1d/2d (units = channels) or LayerNorm (units = normalized elements).

    Factor: ``F`` of shape U × k × k (U units, k = 2 with bias, 1 without).
    """

    kind = "unit_wise"

    unsupported_reason = staticmethod(unit_wise_supported)

    def __init__(self, name: str, module: nn.Module, ctx: CaptureContext) -> None:
        super().__init__(name, module, ctx)
        w = module.weight
        assert isinstance(w, Tensor)
        self.units = int(w.numel())
        self.k = 2 if getattr(module, "bias", None) is not None else 1
        self.f = SymmetricFactor(f"{name}.F", self.k, blocks=self.units, device=self._param_device)

    @property
    def factors(self) -> list[SymmetricFactor]:
        return [self.f]

    def describe(self) -> str:
        return f"{self.name}: {type(self.module).__name__} unit-wise, {self.units} blocks of {self.k}x{self.k}"

    # ---- statistics -------------------------------------------------------------------------------------------
    def normalized_input(self, x: Tensor) -> Tensor:
        """x̂ with the layout of x (fp32): what γ multiplies in the layer's forward."""
        m = self.module
        xf = x.float()
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(xf, m.normalized_shape, eps=m.eps)
        assert isinstance(m, _BN)
        use_batch = m.training or m.running_mean is None
        # the native kernel without affine parameters: batch statistics (biased variance) or the running ones
        running_mean = None if use_batch or m.running_mean is None else m.running_mean.float()
        running_var = None if use_batch or m.running_var is None else m.running_var.float()
        return F.batch_norm(xf, running_mean, running_var, None, None, use_batch, 0.0, m.eps)

    def unit_rows(self, xhat: Tensor, gy: Tensor) -> Tensor:
        """Per-example unit gradients u: U × N × k from x̂ and the per-example output gradient (both like x)."""
        g = gy.float()
        n = g.shape[0]
        if isinstance(self.module, nn.LayerNorm):
            u_dim = self.units
            g2 = g.reshape(n, -1, u_dim)  # N × positions × units
            gg = (g2 * xhat.reshape(n, -1, u_dim)).sum(1)
            gb = g2.sum(1)
        else:
            c = g.shape[1]
            g2 = g.reshape(n, c, -1)
            gg = (g2 * xhat.reshape(n, c, -1)).sum(2)
            gb = g2.sum(2)
        u = torch.stack([gg, gb], dim=-1) if self.k == 2 else gg.unsqueeze(-1)
        return u.transpose(0, 1)  # U × N × k

    def _capture_forward(self, x: Tensor, m: int) -> Callable[[Tensor, float], None]:
        xhat = self.normalized_input(x)[:m]
        n = m

        def on_grad(gy: Tensor, scale: float) -> None:
            self.f.add(self.unit_rows(xhat, gy), scale * scale, n)

        return on_grad

    # ---- preconditioner ---------------------------------------------------------------------------------------
    def draft_preconditioner(self, damping: float, method: str) -> PreconditionerDraft:
        if self.f.value is None:
            raise RuntimeError(f"{self.name}: its factor has no value on this rank (only the owner drafts)")
        inverse = damped_inverse_small(self.f.value, damping)
        return PreconditionerDraft([], lambda: [inverse])

    def preconditioner_shapes(self, method: str) -> list[tuple[int, ...]]:
        return [(self.units, self.k, self.k)]

    def precondition(self, grads: list[Tensor]) -> list[Tensor]:
        if self._inverse is None:
            raise RuntimeError(f"{self.name}: precondition() before a preconditioner was installed")
        u = torch.stack([g.float().reshape(-1) for g in grads], dim=-1)  # U × k
        out = torch.bmm(self._inverse[0], u.unsqueeze(-1)).squeeze(-1)
        return [out[:, j].reshape(grads[j].shape) for j in range(self.k)]
