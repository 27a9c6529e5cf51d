"""A Kronecker side larger than ``max_factor_dim``, held as one factor per diagonal block ("chunks").

Distributed Shampoo's ``max_preconditioner_dim`` blocking (Anil et al. 2020, arXiv:2002.09018 §4.3; Shi et al. 2023,
arXiv:2309.06497 §3) makes a side of ``size`` coordinates block-diagonal: B = ⌈size/max⌉ blocks of b = ⌈size/B⌉
(:func:`ds_spngd.curvature.factor.side_layout`; the last block's tail is zero padding). The blocks are independent
statistics with independent inverses, so each one is its own :class:`SymmetricFactor` here — its own owner rank,
bucket and inversion (SP-NGD's per-layer distribution, Osawa et al. arXiv:1811.12019 §4, at block granularity): a
50257-wide output layer's 13 blocks of 3866² are reduced to and inverted on up to 13 ranks instead of one.

:class:`ChunkedSide` speaks the statistics interface of a :class:`SymmetricFactor` (``add``, ``add_diagonal``,
``cast``, ``size``, ``blocks``, ``dim``, ``padded``, ``value``, ``mean_trace``), so the blocks that own it
(:mod:`ds_spngd.curvature.kronecker`, :mod:`.embedding`, :mod:`.tied`) fill it like one factor, while the reducer,
the refresh schedule and the checkpoints see its :attr:`ChunkedSide.chunks` (``"<name>[k]"``) as ordinary factors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ds_spngd.curvature.factor import Count, SymmetricFactor, real_diagonal, side_layout

__all__ = ["ChunkedSide", "Side", "side_factor", "chunks_of", "side_trace"]


class ChunkedSide:
    """A block-diagonal side whose B diagonal blocks are separate factors (see the module docstring).

    Args:
        name: the side's name, e.g. ``"lm_head.G"``; chunk k is ``"lm_head.G[k]"``.
        size: real coordinates of the side.
        blocks: B.
        dim: b, the side of each block (B·b ≥ size; the last block is padded).
        final_in: as :class:`SymmetricFactor`.
        device: as :class:`SymmetricFactor`.
        diagonal: hold only the diagonal of each block (b entries per chunk, e.g. the token counts of a tied
            embedding aligned with the output layer's blocks), filled by :meth:`add_diagonal`.
    """

    def __init__(self, name: str, size: int, blocks: int, dim: int, final_in: str = "backward",
                 device: Callable[[], torch.device] | None = None, diagonal: bool = False) -> None:
        if blocks < 2 or not (blocks - 1) * dim < size <= blocks * dim:
            raise ValueError(f"side {name}: {blocks} blocks of {dim} cannot hold {size} coordinates")
        self.name, self.size, self.blocks, self.dim, self.diagonal = name, size, blocks, dim, diagonal
        self.chunks: list[SymmetricFactor] = []
        for k in range(blocks):
            real = min(dim, size - k * dim)
            if diagonal:
                chunk = SymmetricFactor(f"{name}[{k}]", 1, blocks=dim, final_in=final_in, device=device, size=real)
            else:
                chunk = SymmetricFactor(f"{name}[{k}]", dim, blocks=1, final_in=final_in, device=device, size=real)
            self.chunks.append(chunk)

    @property
    def padded(self) -> int:
        """B·b: the side's length including the last block's padding."""
        return self.blocks * self.dim

    @property
    def device(self) -> torch.device:
        return self.chunks[0].device

    @property
    def due(self) -> bool:
        """True when any chunk is refreshed this step."""
        return any(c.due for c in self.chunks)

    @property
    def committed(self) -> bool:
        """True once every chunk has a global estimate (identical on every rank)."""
        return all(c.committed for c in self.chunks)

    @property
    def value(self) -> Tensor | None:
        """The B × b × b value (size × 1 × 1 when ``diagonal``, like a token factor) when every chunk's value is
        held here, else None."""
        values = [c.value for c in self.chunks]
        if any(v is None for v in values):
            return None
        full = torch.cat([v for v in values if v is not None])
        return full[: self.size] if self.diagonal else full

    def cast(self, t: Tensor) -> Tensor:
        """As :meth:`SymmetricFactor.cast` (every chunk has the same ``precision``)."""
        return self.chunks[0].cast(t)

    def add(self, rows: Tensor, weight: float, n_examples: Count) -> None:
        """Accumulate weight · rowsᵀ rows per diagonal block from M × size rows (any float dtype): chunk k gets
        columns [k·b, (k+1)·b) (zero padded). Chunks that are not due skip theirs.

        Raises:
            ValueError: the rows do not have ``size`` columns, or the side is ``diagonal``.
        """
        if self.diagonal or rows.dim() != 2 or rows.shape[1] != self.size:
            raise ValueError(f"side {self.name}: expected M x {self.size} rows, got {tuple(rows.shape)}")
        if not self.due:
            return
        r = self.cast(rows)
        if self.padded != self.size:
            r = F.pad(r, (0, self.padded - self.size))
        r3 = r.view(r.shape[0], self.blocks, self.dim)
        for k, chunk in enumerate(self.chunks):
            chunk.add(r3[:, k, :], weight, n_examples)

    def add_diagonal(self, values: Tensor, n_examples: Count) -> None:
        """Add ``size`` diagonal values (e.g. token counts), chunk k taking entries [k·b, (k+1)·b).

        Raises:
            ValueError: ``values`` does not have ``size`` entries.
        """
        if values.numel() != self.size:
            raise ValueError(f"side {self.name}: expected {self.size} diagonal values, got {values.numel()}")
        flat = values.reshape(-1)
        for k, chunk in enumerate(self.chunks):
            chunk.add_diagonal(flat[k * self.dim : k * self.dim + chunk.size], n_examples)

    def mean_trace(self, value: Tensor) -> Tensor:
        """tr(value) / size over the real coordinates of a B × b × b value of this side, a 0-d tensor."""
        return real_diagonal(value, self.size).float().sum() / self.size

    @property
    def nbytes(self) -> int:
        """Bytes of one fp32 copy of every chunk."""
        return sum(c.nbytes for c in self.chunks)


Side = SymmetricFactor | ChunkedSide


def side_factor(name: str, size: int, max_dim: int, method: str, final_in: str = "backward",
                device: Callable[[], torch.device] | None = None) -> Side:
    """A Kronecker side of ``size`` coordinates: one dense factor up to ``max_dim``, its diagonal
    (``method="diagonal"``, one factor), or a :class:`ChunkedSide` of B blocks (``"block"``).

    Raises:
        ValueError: as :func:`ds_spngd.curvature.factor.side_layout`.
    """
    blocks, dim = side_layout(size, max_dim, method)
    if blocks == 1 or dim == 1:
        return SymmetricFactor(name, dim, blocks=blocks, final_in=final_in, device=device, size=size)
    return ChunkedSide(name, size, blocks, dim, final_in=final_in, device=device)


def chunks_of(side: Side) -> list[SymmetricFactor]:
    """The factors a side is made of: its chunks, or the factor itself."""
    return list(side.chunks) if isinstance(side, ChunkedSide) else [side]


def side_trace(side: Side, traces: dict[str, Tensor]) -> Tensor:
    """Trace of a side over its real coordinates: the sum of its factors' entries in ``traces`` (factor name →
    0-d trace, e.g. all-reduced from the chunks' owners by :func:`ds_spngd.comm.inversion.distributed_update`).

    Raises:
        KeyError: a factor of the side has no trace.
    """
    return torch.stack([traces[c.name].reshape(()) for c in chunks_of(side)]).sum()
