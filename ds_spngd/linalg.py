"""Damped inverses and eigendecompositions of symmetric PSD factors, in fp32 with fallbacks.

All functions take and return fp32 tensors on the factor's device (inputs in other dtypes are upcast: half precision
is never used for the inversion itself, Osawa et al. arXiv:1811.12019 §4.2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["pi_correction", "damped_inverse", "sym_eigh", "damped_inverse_small"]


def pi_correction(a: Tensor, g: Tensor) -> float:
    """π of factored Tikhonov damping (Martens & Grosse 2015, arXiv:1503.05671, eq. 6.3 with the trace norm).

    π = sqrt((tr A / dim A) / (tr G / dim G)); A gets π·√λ and G gets √λ/π, so the damped product keeps the scale of
    A ⊗ G + λ·I while splitting it between the two factors.

    Args:
        a: d_A × d_A factor.
        g: d_G × d_G factor.

    Returns:
        π as a Python float; 1.0 when either trace is not positive or not finite (a degenerate factor).
    """
    ta = float(torch.diagonal(a).sum()) / a.shape[-1]
    tg = float(torch.diagonal(g).sum()) / g.shape[-1]
    if not (ta > 0.0 and tg > 0.0 and math.isfinite(ta) and math.isfinite(tg)):
        return 1.0
    return math.sqrt(ta / tg)


def _add_diag(m: Tensor, value: float) -> Tensor:
    out = m.clone()
    out.diagonal(dim1=-2, dim2=-1).add_(value)
    return out


def sym_eigh(m: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric PSD matrix (or a batch): m = Q diag(d) Qᵀ.

    Args:
        m: (…, d, d), symmetric; upcast to fp32.

    Returns:
        (d, Q): eigenvalues (…, d) clamped at 0 (a PSD factor's negative eigenvalues are round-off) and eigenvectors
        (…, d, d), fp32. Falls back to fp64 when the fp32 solver does not converge.

    Raises:
        FloatingPointError: when ``m`` holds NaN/Inf (names nothing: callers add the layer name).
    """
    m32 = m.float()
    if not bool(torch.isfinite(m32).all()):
        raise FloatingPointError("factor contains NaN or Inf")
    m32 = 0.5 * (m32 + m32.transpose(-2, -1))
    try:
        d, q = torch.linalg.eigh(m32)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        d64, q64 = torch.linalg.eigh(m32.double())
        d, q = d64.float(), q64.float()
    return d.clamp_min(0.0), q


def damped_inverse(m: Tensor, damping: float) -> Tensor:
    """(m + damping·I)⁻¹ for a symmetric PSD matrix, by Cholesky in fp32.

    If the Cholesky factorization fails (a factor that lost positive-definiteness to round-off with tiny damping), the
    inverse is formed from an eigendecomposition with eigenvalues clamped at 0, which is the same matrix in exact
    arithmetic.

    Args:
        m: d × d symmetric PSD (any float dtype; upcast to fp32).
        damping: > 0.

    Returns:
        d × d fp32 symmetric inverse.

    Raises:
        FloatingPointError: when ``m`` holds NaN/Inf.
    """
    m32 = m.float()
    if not bool(torch.isfinite(m32).all()):
        raise FloatingPointError("factor contains NaN or Inf")
    damped = _add_diag(m32, damping)
    chol, info = torch.linalg.cholesky_ex(damped)
    if int(info.max()) == 0:
        inv = torch.cholesky_inverse(chol)
        return 0.5 * (inv + inv.transpose(-2, -1))
    d, q = sym_eigh(m32)
    return (q / (d + damping).unsqueeze(-2)) @ q.transpose(-2, -1)


def damped_inverse_small(blocks: Tensor, damping: float) -> Tensor:
    """(F_c + damping·I)⁻¹ for a batch of 1×1 or 2×2 symmetric blocks, in closed form.

    Used by the unit-wise BatchNorm/LayerNorm Fisher (Osawa et al. TPAMI 2020, arXiv:2002.06015 §4): one 2×2 block per
    channel over (γ_c, β_c).

    Args:
        blocks: C × k × k with k ∈ {1, 2}, symmetric PSD; upcast to fp32.
        damping: > 0.

    Returns:
        C × k × k fp32 inverses.

    Raises:
        ValueError: for k > 2.
    """
    b = blocks.float()
    k = b.shape[-1]
    if k == 1:
        return 1.0 / (b + damping)
    if k != 2:
        raise ValueError(f"closed-form inverse supports 1x1 and 2x2 blocks, got {k}x{k}")
    a = b[:, 0, 0] + damping
    c = b[:, 1, 1] + damping
    off = 0.5 * (b[:, 0, 1] + b[:, 1, 0])
    det = a * c - off * off  # > 0: PSD + damping·I is positive definite
    inv = torch.empty_like(b)
    inv[:, 0, 0] = c / det
    inv[:, 1, 1] = a / det
    inv[:, 0, 1] = -off / det
    inv[:, 1, 0] = -off / det
    return inv
