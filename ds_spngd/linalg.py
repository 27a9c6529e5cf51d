"""Damped inverses and eigendecompositions of symmetric PSD factors, in fp32 with fallbacks.

All functions take and return fp32 tensors on the factor's device (inputs in other dtypes are upcast: half precision
is never used for the inversion itself, Osawa et al. arXiv:1811.12019 §4.2).

The optimizer's path never waits on the device per layer: π and the dampings stay tensors, a Cholesky inverse is
started without checking its status (:class:`InverseJob`), and :func:`finish_inverses` checks every job of a step
with one host sync, re-doing only the failed ones by eigendecomposition. :func:`damped_inverse` is the convenient
one-shot form (it syncs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["pi_correction", "pi_from_traces", "damped_inverse", "sym_eigh", "damped_inverse_small", "InverseJob",
           "finish_inverses"]


def pi_correction(a: Tensor, g: Tensor) -> Tensor:
    """π of factored Tikhonov damping (Martens & Grosse 2015, arXiv:1503.05671, eq. 6.3 with the trace norm).

    π = sqrt((tr A / dim A) / (tr G / dim G)); A gets π·√λ and G gets √λ/π, so the damped product keeps the scale of
    A ⊗ G + λ·I while splitting it between the two factors.

    Args:
        a: d_A × d_A factor.
        g: d_G × d_G factor.

    Returns:
        π as a 0-d fp32 tensor on the factors' device (no host sync); 1 when either trace is not positive or not
        finite (a degenerate factor).
    """
    ta = torch.diagonal(a).float().sum() / a.shape[-1]
    tg = torch.diagonal(g).float().sum() / g.shape[-1]
    return pi_from_traces(ta, tg)


def pi_from_traces(ta: Tensor, tg: Tensor) -> Tensor:
    """π = sqrt(ta / tg) from the mean traces tr A / dim A and tr G / dim G (0-d tensors; blocked factors compute
    them over their real coordinates); 1 when either is not positive or not finite. See :func:`pi_correction`."""
    ta, tg = ta.float(), tg.float()
    ok = (ta > 0) & (tg > 0) & torch.isfinite(ta) & torch.isfinite(tg)
    return torch.where(ok, torch.sqrt(ta / torch.where(ok, tg, torch.ones_like(tg))), torch.ones_like(ta))


def _add_diag(m: Tensor, value: Tensor | float) -> Tensor:
    out = m.clone()
    out.diagonal(dim1=-2, dim2=-1).add_(value)
    return out


def sym_eigh(m: Tensor, check: bool = True) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric PSD matrix (or a batch): m = Q diag(d) Qᵀ.

    Args:
        m: (…, d, d), symmetric; upcast to fp32.
        check: raise on NaN/Inf input (one host sync). The optimizer passes False: its factors were checked by
            every rank together before any inversion (:mod:`ds_spngd.comm.agreement`).

    Returns:
        (d, Q): eigenvalues (…, d) clamped at 0 (a PSD factor's negative eigenvalues are round-off) and eigenvectors
        (…, d, d), fp32, Q contiguous. Falls back to fp64 when the fp32 solver does not converge.

    Raises:
        FloatingPointError: ``check`` and ``m`` holds NaN/Inf (names nothing: callers add the layer name).
        torch.linalg.LinAlgError: the fp64 solver did not converge either.
    """
    m32 = m.float()
    if check and not bool(torch.isfinite(m32).all()):
        raise FloatingPointError("factor contains NaN or Inf")
    m32 = 0.5 * (m32 + m32.transpose(-2, -1))
    try:
        d, q = torch.linalg.eigh(m32)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        d64, q64 = torch.linalg.eigh(m32.double())
        d, q = d64.float(), q64.float()
    return d.clamp_min(0.0), q.contiguous()


def _eigen_inverse(m: Tensor, damping: Tensor | float) -> Tensor:
    d, q = sym_eigh(m, check=False)
    return ((q / (d + damping).unsqueeze(-2)) @ q.transpose(-2, -1)).contiguous()


@dataclass
class InverseJob:
    """(m + damping·I)⁻¹ by Cholesky in fp32, started without a host sync.

    Attributes:
        matrix: the (…, d, d) fp32 factor.
        damping: added to the diagonal (a float or a 0-d tensor, e.g. π·√λ).
        inverse: the result, contiguous and symmetrized; valid once :func:`finish_inverses` ran.
        error: set by :func:`finish_inverses` when even the eigendecomposition fallback failed (``inverse`` is then
            not valid).
        failed: 0-d bool tensor, True when the Cholesky factorization failed (the inverse is then recomputed from an
            eigendecomposition with eigenvalues clamped at 0, the same matrix in exact arithmetic).
    """

    matrix: Tensor
    damping: Tensor | float
    inverse: Tensor
    failed: Tensor
    error: str | None = None

    @classmethod
    def start(cls, m: Tensor, damping: Tensor | float) -> InverseJob:
        """Factorize m + damping·I and form the inverse from the factor (L⁻ᵀL⁻¹ by a triangular solve): no check of
        the factorization's status, so no host sync."""
        m32 = m.float()
        if m32.shape[-1] == 1:  # a diagonal factor (B blocks of 1 × 1): elementwise, no factorization
            damped = m32 + damping
            return cls(m32, damping, (1.0 / damped).contiguous(), ~(damped > 0).all())
        chol, info = torch.linalg.cholesky_ex(_add_diag(m32, damping))
        eye = torch.eye(m32.shape[-1], dtype=m32.dtype, device=m32.device).expand_as(m32)
        l_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
        inv = l_inv.transpose(-2, -1) @ l_inv
        inv = (0.5 * (inv + inv.transpose(-2, -1))).contiguous()
        return cls(m32, damping, inv, (info != 0).any())


def finish_inverses(jobs: Sequence[InverseJob]) -> None:
    """Check every job's factorization with one host sync and recompute the failed ones by eigendecomposition.

    A job whose eigendecomposition does not converge either (fp32 nor fp64) gets ``error`` set; the others are
    finished regardless, so a caller can name exactly the factors that failed.
    """
    if not jobs:
        return
    failed = torch.stack([j.failed for j in jobs]).tolist()
    for job, bad in zip(jobs, failed, strict=True):
        if bad:
            try:
                job.inverse = _eigen_inverse(job.matrix, job.damping)
            except torch.linalg.LinAlgError as err:
                job.error = str(err)


def damped_inverse(m: Tensor, damping: float) -> Tensor:
    """(m + damping·I)⁻¹ for a symmetric PSD matrix (or a batch), by Cholesky in fp32 (one-shot, syncs).

    If the Cholesky factorization fails (a factor that lost positive-definiteness to round-off with tiny damping), the
    inverse is formed from an eigendecomposition with eigenvalues clamped at 0, which is the same matrix in exact
    arithmetic.

    Args:
        m: d × d symmetric PSD (any float dtype; upcast to fp32).
        damping: > 0.

    Returns:
        d × d fp32 symmetric inverse (contiguous).

    Raises:
        FloatingPointError: when ``m`` holds NaN/Inf.
        torch.linalg.LinAlgError: the Cholesky and the eigendecomposition fallback both failed.
    """
    if not bool(torch.isfinite(m).all()):
        raise FloatingPointError("factor contains NaN or Inf")
    job = InverseJob.start(m, damping)
    finish_inverses([job])
    if job.error is not None:
        raise torch.linalg.LinAlgError(job.error)
    return job.inverse


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
