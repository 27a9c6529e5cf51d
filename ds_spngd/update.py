"""SP-NGD's update rule after preconditioning: heavy-ball momentum, weight decay, KL-clipping and weight rescaling.

Elementwise on whatever the optimizer's ``param_groups`` hold (whole parameters at ZeRO stage 0, this rank's flat
fp32 partition at ZeRO 1/2), and free of host syncs: scalars that depend on the data (KL-clipping's ν, the weight
norms) stay 0-d tensors on the device.

* Heavy ball with weight decay added after preconditioning (as torch.optim.SGD adds it): d = ĝ + wd·w. With momentum
  correction (Goyal et al. 2017, arXiv:1706.02677 §2.1) the velocity is v_t = η_t·u_t with u ← m·u + d
  (torch.optim.SGD's buffer), i.e. v ← m·(η_t/η_{t−1})·v + η_t·d, well defined when η_{t−1} = 0; without it
  v ← m·v + η_t·d. In both cases w ← w − v.
* KL-clipping (Ba, Grosse & Martens, ICLR 2017): ĝ ← ν·ĝ, ν = min(1, sqrt(κ / (η² Σ_l ĝ_l·g_l))).
* Weight rescaling (SP-NGD, Osawa et al. arXiv:1811.12019): each preconditioned Linear/Conv2d weight with
  ‖W‖_F > sqrt(2·d_out) is rescaled to that norm (norms summed over ZeRO fragments).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["WeightRescaler", "kl_clip_factor", "apply_group", "rescale_bounds", "rescale_weights"]


def kl_clip_factor(kappa: float, lr: float, vg: Tensor) -> Tensor:
    """ν = min(1, sqrt(κ / (η²·vg))) as a 0-d tensor (1 when vg ≤ 0, or at η = 0 where nothing moves).

    Args:
        kappa: κ > 0.
        lr: η.
        vg: Σ_l ĝ_l·g_l, a 0-d tensor (any float dtype).
    """
    one = torch.ones((), dtype=vg.dtype, device=vg.device)
    if lr == 0.0:  # a warmup's first step: no clipping needed, and ν's formula would divide by 0
        return one
    safe = torch.where(vg > 0, vg, one)
    return torch.where(vg > 0, torch.clamp(torch.sqrt(kappa / (lr * lr * safe)), max=1.0), one)


def apply_group(group: dict[str, Any], gi: int, state: Any, directions: dict[tuple[int, int], Tensor],
                momentum_correction: bool, final: dict[tuple[int, int], Tensor | None] | None = None) -> None:
    """Momentum, weight decay and the parameter update for one parameter group (see the module docstring).

    Args:
        group: the group (``lr``, ``momentum``, ``weight_decay``, ``params``).
        gi: its index.
        state: the optimizer's per-parameter state (``momentum_buffer`` lives there, fp32).
        directions: (group, index) → F̂⁻¹g for preconditioned parameters; the others use their gradient.
        momentum_correction: Goyal et al.'s correction (the buffer holds u with v = η·u).
        final: positions whose direction already carries its own momentum (``direction: "polar"``,
            :mod:`ds_spngd.polar`): None = the whole position, else a bool mask of such elements (a ZeRO partition).
            Those elements move by w ← w − η·(d + wd·w), without heavy ball (their momentum buffer entries stay 0).
    """
    lr, m, wd = float(group["lr"]), float(group["momentum"]), float(group["weight_decay"])
    final = final or {}
    for pi, p in enumerate(group["params"]):
        if p.grad is None:
            continue
        d = directions.get((gi, pi))
        d = p.grad.float() if d is None else d
        if wd != 0.0:
            d = d.add(p.float(), alpha=wd)
        mask = final.get((gi, pi), False)
        if m == 0.0 or mask is None:  # no heavy ball, or the whole position is a polar direction
            p.add_(d.to(p.dtype), alpha=-lr)
            continue
        heavy = d if mask is False else d.masked_fill(mask, 0.0)  # type: ignore[arg-type]
        step, alpha = _heavy_ball(state[p], heavy, lr, m, momentum_correction)
        if mask is not False:  # polar elements move by η·d; in these units that is d (corrected) or η·d
            step = torch.where(mask, d if momentum_correction else d * lr, step)  # type: ignore[arg-type]
        p.add_(step.to(p.dtype), alpha=alpha)


def _heavy_ball(st: dict[str, Any], d: Tensor, lr: float, m: float, momentum_correction: bool) -> tuple[Tensor, float]:
    """Advance the momentum buffer with direction d; return (t, α) with the update w ← w + α·t."""
    buf = st.get("momentum_buffer")
    if momentum_correction:  # u ← m·u + d; w ← w − η·u  (v = η·u: corrected heavy ball)
        if buf is None:
            buf = st["momentum_buffer"] = d.clone()
        else:
            buf.mul_(m).add_(d)
        return buf, -lr
    if buf is None:  # v ← m·v + η·d; w ← w − v
        buf = st["momentum_buffer"] = d.mul(lr)
    else:
        buf.mul_(m).add_(d, alpha=lr)
    return buf, -1.0


def rescale_bounds(d_out: Sequence[int], device: torch.device) -> Tensor:
    """sqrt(2·d_out) per block (fp64, on ``device``): the He-initialization norm SP-NGD rescales weights to."""
    return torch.tensor([math.sqrt(2.0 * d) for d in d_out], dtype=torch.float64, device="cpu").to(device)


def rescale_weights(pieces: Sequence[Sequence[Tensor]], bound: Tensor, reduce: Any) -> None:
    """Rescale every weight with ‖W‖_F > sqrt(2·d_out) to that norm, in place, without a host sync.

    Args:
        pieces: per block, the fp32 (master) tensor(s) holding this rank's part of the weight (whole at stage 0,
            a ZeRO fragment or nothing at stages 1/2).
        bound: per block, sqrt(2·d_out) (:func:`rescale_bounds`), on the weights' device.
        reduce: sums a vector of per-block squared norms over the ranks holding pieces (identity at stage 0).
    """
    if not pieces:
        return
    zero = torch.zeros((), dtype=torch.float64, device=bound.device)
    squares = torch.stack([
        sum((torch.linalg.vector_norm(w, dtype=torch.float64).pow(2) for w in ws), zero) for ws in pieces])
    squares = reduce(squares)
    norm = squares.sqrt()
    scale = torch.where(norm > bound, bound / torch.where(norm > 0, norm, torch.ones_like(norm)),
                        torch.ones_like(norm))
    for j, ws in enumerate(pieces):
        for w in ws:
            w.mul_(scale[j])


class WeightRescaler:
    """Weight rescaling of every Kronecker block's weight (SP-NGD, Osawa et al. arXiv:1811.12019; module docstring),
    with the bounds cached on the weights' device.

    Args:
        d_out: per rescaled block, its output dimension (``weight.shape[0]``).
    """

    def __init__(self, d_out: Sequence[int]) -> None:
        self.d_out = list(d_out)
        self._bound: Tensor | None = None

    def __call__(self, pieces: Sequence[Sequence[Tensor]], device: torch.device, reduce: Any) -> None:
        """:func:`rescale_weights` of ``pieces`` (one entry per block given to the constructor)."""
        if not self.d_out:
            return
        if self._bound is None or self._bound.device != device:
            self._bound = rescale_bounds(self.d_out, device)
        rescale_weights(pieces, self._bound, reduce)
