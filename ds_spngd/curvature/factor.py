"""One statistic class for every symmetric curvature factor: K-FAC's A and G and the unit-wise 2×2 blocks.

A factor holds a batch of B symmetric d × d matrices (B = 1 for a Kronecker factor, B = C channels for a unit-wise
block). A Kronecker factor of a side larger than ``max_factor_dim`` is held block-diagonally in the same form
(:meth:`SymmetricFactor.for_side`; a Kronecker block holds such a side as one factor per diagonal block,
:mod:`ds_spngd.curvature.side`; Distributed Shampoo's ``max_preconditioner_dim`` blocking, Anil et al. 2020,
arXiv:2002.09018 §4.3 / Shi et al. 2023, arXiv:2309.06497): a side of ``size`` coordinates becomes B = ⌈size/max⌉
diagonal blocks of d = ⌈size/B⌉ (the last ≤ B−1 coordinates of the last block are zero padding, which damping makes
invertible and which never reaches a parameter), or its diagonal alone (B = size blocks of 1 × 1). No statistic
builds a temporary larger than the factor itself. It is built in three stages per factor-update step:

1. ``add``: each micro-batch's contribution Σ rowsᵀ·rows (times a weight) is summed locally, with the number of
   examples it came from (so the estimate is a per-example average whatever the micro-batch size, gradient
   accumulation or world size);
2. the local means are reduced to the factor's owner rank (:mod:`ds_spngd.comm.factor_reduction`);
3. ``commit`` (owner): the reduced sum / count becomes this step's estimate, folded into the running average
   value ← decay·value + (1 − decay)·estimate (Martens & Grosse 2015 §5; decay 0 keeps the current batch only, as in
   the SP-NGD recipe, Osawa et al. arXiv:1811.12019). Ranks that do not own the factor only ``mark_committed``,
   so ``version`` (and hence "has this factor been estimated") is identical on every rank while ``value`` lives on
   the owner alone. A commit is provisional until ``settle``: a step that fails after it (an inversion failing on
   some rank) calls ``rollback`` and the factor is exactly as before the step.

Tensors live on the device of the parameters the factor serves (``device``, read at use time: DeepSpeed moves the
model after the optimizer was built), and accumulate in fp32 whatever the model's dtype.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor

__all__ = ["SymmetricFactor", "frozen_values", "side_layout", "real_diagonal"]

_FROZEN = threading.local()  # this thread's {id(factor): value} snapshot (frozen_values)
_UNSET = object()


@contextlib.contextmanager
def frozen_values(values: Mapping[int, Tensor | None]) -> Iterator[None]:
    """Within the block, on the calling thread only, ``factor.value`` of every factor whose ``id`` is a key of
    ``values`` reads that snapshot instead of the live value (asynchronous inverses,
    :mod:`ds_spngd.comm.async_inversion`: the worker inverts the factors of its launch step while the main thread
    commits newer ones). A commit rebinds ``value`` to a new tensor and never writes into the old one, so a snapshot
    of the tensors themselves stays valid."""
    previous = getattr(_FROZEN, "values", None)
    _FROZEN.values = values
    try:
        yield
    finally:
        _FROZEN.values = previous

Count = float | Tensor  # number of examples (or positions) behind a sum: a host number or a 0-d device tensor


def side_layout(size: int, max_dim: int, method: str) -> tuple[int, int]:
    """(blocks B, block side d) of a Kronecker side of ``size`` coordinates (see the module docstring).

    Args:
        size: the side's dimension (d_in [+1] or d_out).
        max_dim: ``max_factor_dim``: a side up to this size stays one dense block.
        method: ``"block"`` (block-diagonal, blocks of at most max_dim) or ``"diagonal"`` for a larger side.

    Raises:
        ValueError: unknown ``method`` or non-positive sizes.
    """
    if size < 1 or max_dim < 1:
        raise ValueError(f"factor side {size} and max_factor_dim {max_dim} must be positive")
    if size <= max_dim:
        return 1, size
    if method == "diagonal":
        return size, 1
    if method != "block":
        raise ValueError(f"unknown large_dim_method {method!r}")
    blocks = math.ceil(size / max_dim)
    return blocks, math.ceil(size / blocks)


def real_diagonal(value: Tensor, size: int) -> Tensor:
    """The first ``size`` entries of the (block-)diagonal of a B × d × d value: a side's real coordinates, the
    padding of its last block dropped."""
    return value.diagonal(dim1=-2, dim2=-1).reshape(-1)[:size]


class SymmetricFactor:
    """Running estimate of E[x xᵀ] for B independent blocks.

    Args:
        name: for messages, e.g. ``"conv1.A"``.
        dim: d, the side of each block.
        blocks: B, the number of independent blocks (1 for Kronecker factors).
        final_in: ``"forward"`` when the factor's last contribution of a micro-batch arrives in the forward pass
            (K-FAC's A), ``"backward"`` otherwise (G, unit-wise blocks): the bucket order of the reduction.
        device: callable giving the device of the parameters this factor serves (default: the CPU).
        size: the number of real coordinates (default B·d; less when the last block is padded, see
            :meth:`for_side`).

    Attributes:
        accum: B × d × d fp32 local sum of this step's contributions, or None when nothing was added.
        count: number of examples behind ``accum`` (this rank): a float, or a 0-d device tensor when it depends on
            data (positions that are not masked), so that counting never syncs with the host.
        value: B × d × d fp32 running average after the last commit, or None before the first.
        version: increments on each commit on every rank (owner or not).
        on_add: called with the factor after every ``add`` (the reducer counts contributions to launch buckets).
        precision: dtype of the outer products (``factor_dtype`` of the config, :meth:`cast`): ``"auto"``,
            ``"bf16"`` or ``"fp32"``; the accumulator is fp32 whatever it says.
        due: False while this factor's refresh is skipped (``stale_statistics``, :mod:`ds_spngd.staleness`):
            :meth:`add` and :meth:`add_diagonal` then do nothing (no product, no count, no reducer notification).
    """

    def __init__(self, name: str, dim: int, blocks: int = 1, final_in: str = "backward",
                 device: Callable[[], torch.device] | None = None, size: int | None = None) -> None:
        self.name = name
        self.dim = dim
        self.blocks = blocks
        self.size = blocks * dim if size is None else size
        # padding: at most B − 1 coordinates (a blocked side), or a one-block chunk of a side (curvature/side.py)
        if not min(blocks * dim - blocks, (blocks - 1) * dim) < self.size <= blocks * dim:
            raise ValueError(f"factor {name}: {blocks} blocks of {dim} cannot hold {self.size} coordinates")
        self.final_in = final_in
        self._device = device
        self.on_add: Callable[[SymmetricFactor], None] | None = None
        self.precision: str = "auto"
        self.due: bool = True
        self.accum: Tensor | None = None
        self.count: Count = 0.0
        self._value: Tensor | None = None
        self.version: int = 0
        self._backup: tuple[Tensor | None, int] | None = None

    @classmethod
    def for_side(cls, name: str, size: int, max_dim: int, method: str, final_in: str = "backward",
                 device: Callable[[], torch.device] | None = None) -> SymmetricFactor:
        """A Kronecker factor of a side of ``size`` coordinates: dense up to ``max_dim``, else block-diagonal or
        diagonal (:func:`side_layout`)."""
        blocks, dim = side_layout(size, max_dim, method)
        return cls(name, dim, blocks=blocks, final_in=final_in, device=device, size=size)

    @property
    def value(self) -> Tensor | None:
        """The committed running average (B × d × d fp32; None before the first commit, and on ranks that do not
        own the factor); inside :func:`frozen_values` on this thread, the snapshot."""
        frozen = getattr(_FROZEN, "values", None)
        if frozen is not None:
            snap = frozen.get(id(self), _UNSET)
            if snap is not _UNSET:
                return snap  # type: ignore[no-any-return]
        return self._value

    @value.setter
    def value(self, value: Tensor | None) -> None:
        self._value = value

    @property
    def padded(self) -> int:
        """B·d: the side's length including the padding of the last block."""
        return self.blocks * self.dim

    @property
    def device(self) -> torch.device:
        """Where this factor's tensors live: the device of the parameters it serves."""
        return self._device() if self._device is not None else torch.device("cpu")

    @property
    def nbytes(self) -> int:
        """Bytes of one fp32 B × d × d tensor of this factor (its value, or its accumulator)."""
        return 4 * self.blocks * self.dim * self.dim

    @property
    def packed_numel(self) -> int:
        """Length of the packed upper triangle: B·d(d+1)/2."""
        return self.blocks * self.dim * (self.dim + 1) // 2

    def cast(self, t: Tensor) -> Tensor:
        """``t`` in the dtype this factor's outer products use: bf16 rows stay bf16 under ``"auto"``, every dtype
        becomes bf16 under ``"bf16"``; everything else (fp16, fp32, ``"fp32"``) becomes fp32. No copy when the dtype
        already matches."""
        if self.precision == "bf16" or (self.precision == "auto" and t.dtype == torch.bfloat16):
            return t.to(torch.bfloat16)
        return t.float()

    def add(self, rows: Tensor, weight: float, n_examples: Count) -> None:
        """Accumulate weight · rowsᵀ rows (per block) from one micro-batch.

        Args:
            rows: M × d (B = 1), B × M × d, or M × size for a blocked / diagonal side (:meth:`for_side`: the
                coordinates are split into the blocks, the padding is zero); any float dtype, brought to the
                product dtype by :meth:`cast` (bf16 or fp32); the products are added to the fp32 accumulator.
            weight: scalar multiplying the outer-product sum (e.g. 1/|T| for KFC's G, scale² for loss scaling).
            n_examples: the number of examples (or positions) the M rows came from (added to ``count``).

        Raises:
            ValueError: when the trailing dimension or block count does not match the factor.
        """
        if not self.due:
            return
        r = self.cast(rows)
        if r.dim() == 2 and self.blocks > 1 and r.shape[1] == self.size:
            if self.dim == 1:  # diagonal: Σ_rows r² per coordinate, no M × size × 1 detour
                self._ensure_accum(r.device)
                assert self.accum is not None
                self.accum.view(-1)[: self.size].add_(r.square().sum(0, dtype=torch.float32), alpha=weight)
                self._count(n_examples)
                return
            if self.padded != self.size:
                r = torch.nn.functional.pad(r, (0, self.padded - self.size))
            r = r.view(r.shape[0], self.blocks, self.dim).transpose(0, 1)  # B × M × d (strided view)
        if r.dim() == 2:
            r = r.unsqueeze(0)
        if r.dim() != 3 or r.shape[0] != self.blocks or r.shape[2] != self.dim:
            raise ValueError(
                f"factor {self.name}: expected rows of shape {'' if self.blocks == 1 else f'{self.blocks} x '}"
                f"M x {self.dim}, got {tuple(rows.shape)}"
            )
        self._ensure_accum(r.device)
        assert self.accum is not None
        if r.dtype != torch.float32:  # bf16 product (fp32 accumulation inside the matmul), added in fp32
            self.accum.add_(torch.matmul(r.transpose(1, 2), r), alpha=weight)
        elif self.blocks == 1:
            self.accum[0].addmm_(r[0].t(), r[0], alpha=weight)
        else:
            self.accum.baddbmm_(r.transpose(1, 2), r, alpha=weight)
        self._count(n_examples)

    def add_diagonal(self, values: Tensor, n_examples: Count) -> None:
        """Accumulate a diagonal contribution (e.g. token counts: the input factor of an embedding, whose one-hot
        rows e eᵀ are diagonal).

        Args:
            values: ``size`` values (any float dtype) added to the diagonal of the (block-diagonal) factor.
            n_examples: as for :meth:`add`.

        Raises:
            ValueError: when ``values`` does not have ``size`` entries.
        """
        if not self.due:
            return
        if values.numel() != self.size:
            raise ValueError(f"factor {self.name}: expected {self.size} diagonal values, got {values.numel()}")
        self._ensure_accum(values.device)
        assert self.accum is not None
        full = values.reshape(-1).float()
        if self.padded != self.size:
            full = torch.nn.functional.pad(full, (0, self.padded - self.size))
        self.accum.diagonal(dim1=1, dim2=2).add_(full.view(self.blocks, self.dim))
        self._count(n_examples)

    def _ensure_accum(self, device: torch.device) -> None:
        if self.accum is None:
            self.accum = torch.zeros(self.blocks, self.dim, self.dim, dtype=torch.float32, device=device)

    def _count(self, n_examples: Count) -> None:
        self.count = self.count + n_examples
        if self.on_add is not None:
            self.on_add(self)

    def diagonal_of(self, value: Tensor) -> Tensor:
        """The ``size`` real diagonal entries of a B × d × d value of this factor (padding dropped)."""
        return real_diagonal(value, self.size)

    def trace(self) -> Tensor | None:
        """tr(value) over the real coordinates (0-d fp32), None while this rank holds no value."""
        return None if self.value is None else self.diagonal_of(self.value).float().sum()

    def mean_trace(self, value: Tensor) -> Tensor:
        """tr(value) / size over the real coordinates, a 0-d tensor (π of factored damping)."""
        return self.diagonal_of(value).float().sum() / self.size

    @property
    def committed(self) -> bool:
        """True once a global estimate was committed (on every rank, owner or not)."""
        return self.version > 0

    def take_local(self) -> tuple[Tensor, Count]:
        """Return (local sum, local count) for reduction and clear the accumulator.

        A factor that received nothing this step contributes zeros on :attr:`device` (so collective shapes stay
        identical on every rank) and count 0.
        """
        acc = self.accum
        if acc is None:
            acc = torch.zeros(self.blocks, self.dim, self.dim, dtype=torch.float32, device=self.device)
        count = self.count
        self.accum, self.count = None, 0.0
        return acc, count

    def commit(self, total: Tensor, count: float, decay: float) -> bool:
        """Fold a globally reduced sum into the running average (provisionally: see :meth:`rollback`).

        The caller has checked that ``total`` is finite (:mod:`ds_spngd.comm.agreement`: every rank agrees first).

        Args:
            total: B × d × d reduced sum over all ranks and micro-batches.
            count: total number of examples behind ``total``.
            decay: running-average decay in [0, 1).

        Returns:
            False when ``count`` is 0 (no example reached this factor on any rank; value unchanged), else True.
        """
        if count <= 0:
            return False
        self._backup = (self.value, self.version)
        estimate = total.to(device=self.device, dtype=torch.float32) / count
        if self.value is None or decay == 0.0:
            self.value = estimate
        else:  # out of place: the old value stays intact for a rollback
            self.value = self.value * decay + estimate * (1.0 - decay)
        self.version += 1
        return True

    def mark_committed(self, received: bool) -> None:
        """Non-owner side of :meth:`commit`: keep ``version`` in step with the owner's (no value is held here)."""
        if received:
            self._backup = (self.value, self.version)
            self.version += 1

    def rollback(self) -> None:
        """Undo the last :meth:`commit` / :meth:`mark_committed` of this step (the step failed after it)."""
        if self._backup is not None:
            self.value, self.version = self._backup
            self._backup = None

    def settle(self) -> None:
        """Make the last commit final (frees the backup reference)."""
        self._backup = None

    def state_dict(self) -> dict[str, object]:
        return {"value": self.value, "version": self.version}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict`'s value (moved to :attr:`device`, fp32) and version.

        Raises:
            ValueError: the saved value has the wrong shape.
        """
        value = state["value"]
        if value is not None:
            if not isinstance(value, Tensor) or tuple(value.shape) != (self.blocks, self.dim, self.dim):
                raise ValueError(f"factor {self.name}: checkpoint value has the wrong shape")
            value = value.to(device=self.device, dtype=torch.float32).clone()
        self.value = value
        self.version = int(state["version"])  # type: ignore[call-overload]
        self._backup = None
