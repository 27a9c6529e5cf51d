"""Packing symmetric factors as their upper triangles (Osawa et al. arXiv:1811.12019 §4.1).

A symmetric d × d block travels as its d(d+1)/2 upper-triangle values (row-major order), roughly halving factor
traffic; a batch of B blocks travels as B·d(d+1)/2 values. Packing optionally casts to a communication dtype
(fp32/bf16/fp16). The triangle's flat indices are made on the matrices' device once per call and side d (int32 while
d² fits, transient: no index tensors are kept alive between steps) and used by gathers whose output size is known in
advance, so packing never waits on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["triu_numel", "pack_symmetric", "unpack_symmetric"]


def triu_numel(dim: int) -> int:
    """Number of values in the upper triangle (diagonal included) of a dim × dim matrix."""
    return dim * (dim + 1) // 2


def _triu_flat(dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Flat indices (row·d + col) of the upper triangle, row-major, and of its mirror in the lower triangle."""
    dtype = torch.int32 if dim * dim < 2**31 else torch.int64
    rows, cols = torch.triu_indices(dim, dim, dtype=dtype, device=device)
    return rows * dim + cols, cols * dim + rows


def _indices(made: dict[tuple[int, torch.device], tuple[Tensor, Tensor]], dim: int,
             device: torch.device) -> tuple[Tensor, Tensor]:
    """:func:`_triu_flat` of ``dim``, made once per call of :func:`pack_symmetric` / :func:`unpack_symmetric` (a
    bucket holds many factors of the same side; nothing is kept after the call)."""
    key = (dim, device)
    if key not in made:
        made[key] = _triu_flat(dim, device)
    return made[key]


def pack_symmetric(mats: Sequence[Tensor], dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> Tensor:
    """Concatenate the upper triangles of batches of symmetric matrices into one flat buffer.

    Args:
        mats: tensors of shape B_i × d_i × d_i (or d_i × d_i, treated as B_i = 1), all on one device.
        dtype: communication dtype of the result (default: fp32).
        device: device of an empty result (no ``mats``); otherwise the result is on the matrices' device.

    Returns:
        1-D tensor of length Σ B_i·d_i(d_i+1)/2.
    """
    parts = []
    flat_indices: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}  # made once per call and side
    for m in mats:
        m3 = m if m.dim() == 3 else m.unsqueeze(0)
        d = m3.shape[-1]
        upper, _ = _indices(flat_indices, d, m3.device)
        parts.append(m3.reshape(m3.shape[0], d * d).index_select(1, upper).reshape(-1))
    if not parts:
        return torch.empty(0, dtype=dtype or torch.float32, device=device if device is not None else "cpu")
    return torch.cat(parts).to(dtype or torch.float32)


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
    flat_indices: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}  # made once per call and side
    for b, d in shapes:
        n = b * triu_numel(d)
        chunk = flat[offset : offset + n].to(dtype).reshape(b, -1)
        offset += n
        upper, lower = _indices(flat_indices, d, flat.device)
        full = torch.zeros(b, d * d, dtype=dtype, device=flat.device)
        full[:, lower] = chunk
        full[:, upper] = chunk
        out.append(full.reshape(b, d, d))
    return out
