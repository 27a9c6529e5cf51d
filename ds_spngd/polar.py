"""Polar natural-gradient directions (``"direction": "polar"``): the orthogonalized momentum of K-FAC's F̂⁻¹g.

For every Kronecker-factored block (Linear, Conv2d, Conv1D, Embedding, a tied embedding/head) with weight gradient
matrix ∇ = [∇W | ∇b] (d_out × d_A) and preconditioned gradient P(∇) = G⁻¹ ∇ A⁻¹ (factored Tikhonov damping, or the
eigenbasis form of ``inverse_method: "eigen"``):

    u ← β·u + P(∇)                      (momentum of the preconditioned gradient, kept by the rank preconditioning it)
    n = P(∇) + β·u  (Nesterov)  or  u
    D = msgn(n) · sqrt(max(1, d_out / d_A))

msgn(X) = U Vᵀ for X = U S Vᵀ (the polar factor) is approximated by the quintic Newton–Schulz iteration of Muon
(Jordan et al. 2024, github.com/KellerJordan/Muon; coefficients (3.4445, −4.7750, 2.0315), which leave the singular
values in about [0.7, 1.2] rather than exactly 1, a deliberate trade of precision for speed). With the preconditioner
fixed between inversions, the momentum of P(∇) is P(momentum of ∇), so D is Newton-Muon's update msgn(M A⁻¹) (Du &
Su 2026, arXiv:2604.01472, eq. for W ← W − η·msgn(G(ZZᵀ)⁻¹)) with K-FAC's output-side factor G⁻¹ applied too —
Muon's spectral-norm steepest descent (Bernstein & Newhouse 2024, arXiv:2409.20325) in K-FAC's whitened coordinates.
The update is then w ← w − η·(D + wd·w): the optimizer's heavy-ball momentum is not applied again to these blocks,
and KL-clipping (which bounds a natural-gradient step's size) leaves them alone: their size is fixed by η.
Unit-wise blocks (BatchNorm/LayerNorm scales) and parameters without a block keep the natural / plain gradient with
heavy-ball momentum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ds_spngd.curvature.base import FisherBlock
from ds_spngd.curvature.kronecker import KroneckerBlock

__all__ = ["NS_COEFFICIENTS", "PolarSettings", "newton_schulz", "polar_block", "polar_scale", "polar_update",
           "takes_polar"]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""(a, b, c) of the quintic Newton–Schulz step X ← a·X + (b·XXᵀ + c·(XXᵀ)²)·X (Muon's choice)."""


def newton_schulz(x: Tensor, steps: int = 5) -> Tensor:
    """Approximate polar factor msgn(x) = U Vᵀ of a matrix by quintic Newton–Schulz iterations.

    The iteration X ← a·X + (b·XXᵀ + c·(XXᵀ)²)·X runs on the wide orientation (rows r ≤ columns k) after scaling x
    to unit Frobenius norm (all singular values ≤ 1, inside the iteration's basin). Every iterate is X₀·Q with Q a
    polynomial in the r × r Gram matrix S = X₀X₀ᵀ, so when k ≥ 2r (a tall or wide block, e.g. a vocabulary-sized
    head) the iteration runs on Q alone — Q ← a·Q + b·Q·M + c·Q·M², M = QᵀSQ — and X₀ is multiplied once at the end
    (the "Gram Newton–Schulz" form DeepSpeed's Muon also uses): 4·r²·k + O(steps·r³) FLOPs instead of
    steps·(4·r²·k + 2·r³), the same polynomial up to rounding.

    Args:
        x: a (rows × cols) matrix, any float dtype (computed in fp32 unless x is fp64).
        steps: iterations (5 in Muon).

    Returns:
        A (rows × cols) matrix in x's dtype with x's singular vectors and singular values in about [0.7, 1.2];
        zero for a zero x.

    Raises:
        ValueError: x is not 2-D.
    """
    if x.dim() != 2:
        raise ValueError(f"newton_schulz expects a matrix, got shape {tuple(x.shape)}")
    a, b, c = NS_COEFFICIENTS
    work = x.double() if x.dtype == torch.float64 else x.float()
    tall = work.shape[0] > work.shape[1]
    y = work.t() if tall else work
    y = y / (torch.linalg.matrix_norm(y) + 1e-7)
    r, k = y.shape
    if k >= 2 * r:  # Gram form: iterate on r × r matrices only
        gram = y @ y.t()
        q = torch.eye(r, dtype=y.dtype, device=y.device)
        for _ in range(steps):
            m = q.t() @ gram @ q  # (X₀Q)(X₀Q)ᵀ = Qᵀ S Q: Q is a polynomial in S, so Q and S commute
            q = a * q + q @ (b * m + c * (m @ m))
        y = q.t() @ y
    else:
        for _ in range(steps):
            gram = y @ y.t()
            y = a * y + (b * gram + c * (gram @ gram)) @ y
    return (y.t() if tall else y).to(x.dtype)


def polar_scale(rows: int, cols: int) -> float:
    """sqrt(max(1, rows / cols)): Muon's shape factor, so a tall matrix's update has the same per-entry RMS as a
    square one's (DeepSpeed's ``_aspect_ratio_scale``)."""
    return math.sqrt(max(1.0, rows / cols))


def polar_update(direction: Tensor, buffer: Tensor | None, beta: float, nesterov: bool,
                 steps: int) -> tuple[Tensor, Tensor]:
    """One block's polar direction from its preconditioned gradient matrix (module docstring).

    Args:
        direction: P(∇), the block's preconditioned gradient as one (d_out × d_A) fp32 matrix.
        buffer: the block's momentum u from the previous step (same shape), or None on its first step.
        beta: β ∈ [0, 1).
        nesterov: use n = P(∇) + β·u instead of u.
        steps: Newton–Schulz iterations.

    Returns:
        (D, the new buffer u). The buffer is updated in place when given.
    """
    if buffer is None:
        buffer = direction.detach().clone()
    else:
        buffer.mul_(beta).add_(direction)
    n = direction.add(buffer, alpha=beta) if nesterov else buffer
    rows, cols = n.shape
    return newton_schulz(n, steps).mul_(polar_scale(rows, cols)), buffer


@dataclass(frozen=True)
class PolarSettings:
    """``polar_momentum`` β, ``polar_nesterov`` and ``polar_steps`` (:class:`ds_spngd.config.SPNGDConfig`)."""

    beta: float = 0.95
    nesterov: bool = True
    steps: int = 5


def takes_polar(block: FisherBlock) -> bool:
    """True for Kronecker-factored blocks (their gradient is one d_out × d_A matrix); unit-wise blocks keep the
    natural gradient."""
    return isinstance(block, KroneckerBlock)


def polar_block(block: KroneckerBlock, precond: list[Tensor], settings: PolarSettings) -> list[Tensor]:
    """The polar direction of one block from its preconditioned gradients F̂⁻¹g (the block's parameter shapes),
    advancing the block's ``direction_momentum`` (held by the rank that preconditions the block).

    Returns:
        D split back into the block's parameter shapes (fp32).
    """
    matrix = block.grad_matrix(precond)
    d, block.direction_momentum = polar_update(matrix, block.direction_momentum, settings.beta, settings.nesterov,
                                               settings.steps)
    return block.split_matrix(d, precond)
