"""Packing symmetric factors as their upper triangles (Osawa et al. arXiv:1811.12019 §4.1).

A symmetric d × d block travels as its d(d+1)/2 upper-triangle values, roughly halving factor traffic; a batch of B
blocks travels as B·d(d+1)/2 values. Packing optionally casts to a communication dtype (fp32/bf16/fp16).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["triu_numel", "pack_symmetric", "unpack_symmetric"]


def triu_numel(dim: int) -> int:
    """Number of values in the upper triangle (diagonal included) of a dim × dim matrix."""
    return dim * (dim + 1) // 2


@lru_cache(maxsize=256)
def _triu_flat_index(dim: int, device_str: str) -> tuple[Tensor, Tensor]:
    rows, cols = torch.triu_indices(dim, dim, device=device_str)
    upper = rows * dim + cols
    lower = cols * dim + rows
    return upper, lower


def pack_symmetric(mats: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """Concatenate the upper triangles of batches of symmetric matrices into one flat buffer.

    Args:
        mats: tensors of shape B_i × d_i × d_i (or d_i × d_i, treated as B_i = 1).
        dtype: communication dtype of the result (default: fp32).

    Returns:
        1-D tensor of length Σ B_i·d_i(d_i+1)/2.
    """
    parts = []
    for m in mats:
        m3 = m if m.dim() == 3 else m.unsqueeze(0)
        d = m3.shape[-1]
        upper, _ = _triu_flat_index(d, str(m3.device))
        parts.append(m3.reshape(m3.shape[0], d * d).index_select(1, upper).reshape(-1))
    out = torch.cat(parts) if parts else torch.empty(0)
    return out.to(dtype or torch.float32)


def unpack_symmetric(
    flat: Tensor, shapes: Sequence[tuple[int, int]], dtype: torch.dtype = torch.float32
) -> list[Tensor]:
    """Inverse of :func:`pack_symmetric`.

    Args:
        flat: 1-D buffer produced by ``pack_symmetric`` (any dtype).
        shapes: (B_i, d_i) for every packed batch, in packing order.
        dtype: dtype of the returned matrices.

    Returns:
        Symmetric tensors of shape B_i × d_i × d_i.

    Raises:
        ValueError: when the buffer length does not match the shapes.
    """
    need = sum(b * triu_numel(d) for b, d in shapes)
    if flat.numel() != need:
        raise ValueError(f"packed buffer has {flat.numel()} values, shapes need {need}")
    out = []
    offset = 0
    for b, d in shapes:
        n = b * triu_numel(d)
        chunk = flat[offset : offset + n].to(dtype).reshape(b, -1)
        offset += n
        upper, lower = _triu_flat_index(d, str(flat.device))
        full = torch.zeros(b, d * d, dtype=dtype, device=flat.device)
        full.index_copy_(1, lower, chunk)
        full.index_copy_(1, upper, chunk)
        out.append(full.reshape(b, d, d))
    return out
