"""Unit-wise Fisher blocks for BatchNorm1d/2d, LayerNorm and RMSNorm (Osawa et al., "Scalable and Practical
Natural Gradient for Large-Scale Deep Learning", TPAMI 2020, arXiv:2002.06015 §4.2).

Each unit c (a BatchNorm channel, or a LayerNorm/RMSNorm normalized element) has its own scale γ_c and, when the
layer has one, shift β_c. The Fisher is approximated as block-diagonal over units with one k × k block per unit
(k = 2 with a bias, k = 1 without: LayerNorm(bias=False), RMSNorm):

    F_c = E_i[u_{i,c} u_{i,c}ᵀ],  u_{i,c} = (Σ_r g_{i,c,r} x̂_{i,c,r},  Σ_r g_{i,c,r})   (second entry only if k = 2)

where g = ∂ℓ_i/∂y is the per-example output gradient, x̂ the normalized input (what γ multiplies) and r runs over
the unit's other positions (spatial positions for BatchNorm2d, sequence/leading positions for LayerNorm and RMSNorm).
u_{i,c} is exactly the per-example gradient ∂ℓ_i/∂(γ_c, β_c). The preconditioned gradient is
(F_c + λ·I)⁻¹ (∂L/∂γ_c, ∂L/∂β_c), inverted in closed form (a scalar division when k = 1).

x̂ is recomputed from the input in the forward hook:

* BatchNorm: batch statistics in training mode (biased variance, as BatchNorm normalizes), running statistics
  otherwise;
* LayerNorm: x̂ = (x − mean) / sqrt(var + eps) over ``normalized_shape`` (biased variance);
* RMSNorm (``elementwise_affine=True``, scale only: k = 1): x̂ = x / sqrt(mean(x², over ``normalized_shape``) + eps),
  i.e. the layer's output with γ = 1, computed by ``F.rms_norm`` with the module's own ``eps``. ``eps=None`` keeps
  torch's meaning: the machine epsilon of the computation (opmath) type — ``torch.finfo(torch.float32).eps`` for
  fp16/bf16/fp32 inputs, ``torch.finfo(torch.float64).eps`` for fp64 — so x̂ is computed in fp64 for fp64 inputs
  and in fp32 otherwise.

Norm layers without affine parameters have nothing to precondition and are left to the base update.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ds_spngd.curvature.base import CaptureContext, FisherBlock, PreconditionerDraft, full_numel
from ds_spngd.curvature.factor import SymmetricFactor
from ds_spngd.linalg import damped_inverse_small

__all__ = ["UnitWiseBlock", "unit_wise_supported"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_ELEMENTWISE = (nn.LayerNorm, nn.RMSNorm)  # units = the normalized elements, positions = the leading dimensions


def unit_wise_supported(module: nn.Module) -> str | None:
    """Return None when the module can be a unit-wise block, else the reason it falls back to the base update."""
    if isinstance(module, _BN):
        return None if module.affine else f"{type(module).__name__} without affine parameters"
    if isinstance(module, _ELEMENTWISE):
        if not module.elementwise_affine or getattr(module, "weight", None) is None:
            return f"{type(module).__name__} without elementwise_affine"
        return None
    return f"{type(module).__name__} has no unit-wise block"


class UnitWiseBlock(FisherBlock):
    """Unit-wise block of a BatchNorm1d/2d (units = channels) or LayerNorm/RMSNorm (units = normalized elements).

    Factor: ``F`` of shape U × k × k (U = weight.numel() units, k = 2 with a bias, 1 without — always 1 for RMSNorm).
    Preconditioner: the U × k × k damped inverses (F_c + λ·I)⁻¹.
    """

    kind = "unit_wise"

    unsupported_reason = staticmethod(unit_wise_supported)

    def __init__(self, name: str, module: nn.Module, ctx: CaptureContext) -> None:
        super().__init__(name, module, ctx)
        w = module.weight
        assert isinstance(w, Tensor)
        self.units = full_numel(w)
        self.k = 2 if getattr(module, "bias", None) is not None else 1
        self.f = SymmetricFactor(f"{name}.F", self.k, blocks=self.units, device=self._param_device)

    @property
    def factors(self) -> list[SymmetricFactor]:
        return [self.f]

    def describe(self) -> str:
        return f"{self.name}: {type(self.module).__name__} unit-wise, {self.units} blocks of {self.k}x{self.k}"

    # ---- statistics -------------------------------------------------------------------------------------------
    def normalized_input(self, x: Tensor) -> Tensor:
        """x̂ with the layout and shape of x (N × …, returned in fp32): what γ multiplies in the layer's forward.

        LayerNorm/RMSNorm normalize in the opmath type of x (fp64 for fp64 inputs, fp32 otherwise), as torch does.
        """
        m = self.module
        if isinstance(m, _ELEMENTWISE):
            xo = x.double() if x.dtype == torch.float64 else x.float()
            if isinstance(m, nn.RMSNorm):
                # eps None → torch's default for xo's dtype (= x's opmath type): the value the layer itself used
                return F.rms_norm(xo, list(m.normalized_shape), None, m.eps).float()
            return F.layer_norm(xo, m.normalized_shape, eps=m.eps).float()
        xf = x.float()
        assert isinstance(m, _BN)
        use_batch = m.training or m.running_mean is None
        # the native kernel without affine parameters: batch statistics (biased variance) or the running ones
        running_mean = None if use_batch or m.running_mean is None else m.running_mean.float()
        running_var = None if use_batch or m.running_var is None else m.running_var.float()
        return F.batch_norm(xf, running_mean, running_var, None, None, use_batch, 0.0, m.eps)

    def unit_rows(self, xhat: Tensor, gy: Tensor) -> Tensor:
        """Per-example unit gradients u: U × N × k from x̂ and the per-example output gradient g (both N × …, like x).

        BatchNorm: units are dim 1 (N × C × …), summed over the trailing positions. LayerNorm/RMSNorm: units are the
        trailing ``normalized_shape`` elements (N × … × U after flattening), summed over the middle positions.
        """
        g = gy.float()
        n = g.shape[0]
        if isinstance(self.module, _ELEMENTWISE):
            u_dim = self.units
            g2 = g.reshape(n, -1, u_dim)  # N × positions × units
            gg = (g2 * xhat.reshape(n, -1, u_dim)).sum(1)  # N × U
            pos = 1
        else:
            c = g.shape[1]
            g2 = g.reshape(n, c, -1)  # N × channels × positions
            gg = (g2 * xhat.reshape(n, c, -1)).sum(2)  # N × U
            pos = 2
        u = torch.stack([gg, g2.sum(pos)], dim=-1) if self.k == 2 else gg.unsqueeze(-1)  # N × U × k
        return u.transpose(0, 1)  # U × N × k

    def _capture_forward(self, x: Tensor, m: int) -> Callable[[Tensor, float | Tensor], None]:
        # BatchNorm's x̂ needs the whole micro-batch (its batch statistics); LayerNorm/RMSNorm's is per example
        xhat = self.normalized_input(x if isinstance(self.module, _BN) else x[:m])[:m]
        n = int(x.shape[0])

        def on_grad(gy: Tensor, scale: float | Tensor) -> None:
            # u is the example's gradient of its summed loss terms; F averages u uᵀ over the M terms (per-term
            # Fisher, as the Kronecker blocks' G; M = m examples for a classifier)
            self.f.add(self.unit_rows(xhat, gy) * scale, 1.0, self.ctx.terms_in(m, n))

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
