"""One statistic class for every symmetric curvature factor: K-FAC's A and G and the unit-wise 2×2 blocks.

A factor holds a batch of B symmetric d × d matrices (B = 1 for a Kronecker factor, B = C channels for a unit-wise
block). It is built in three stages per factor-update step:

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

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["SymmetricFactor"]


class SymmetricFactor:
    """Running estimate of E[x xᵀ] for B independent blocks.

    Args:
        name: for messages, e.g. ``"conv1.A"``.
        dim: d, the side of each block.
        blocks: B, the number of independent blocks (1 for Kronecker factors).
        final_in: ``"forward"`` when the factor's last contribution of a micro-batch arrives in the forward pass
            (K-FAC's A), ``"backward"`` otherwise (G, unit-wise blocks): the bucket order of the reduction.
        device: callable giving the device of the parameters this factor serves (default: the CPU).

    Attributes:
        accum: B × d × d fp32 local sum of this step's contributions, or None when nothing was added.
        count: number of examples behind ``accum`` (this rank).
        value: B × d × d fp32 running average after the last commit, or None before the first.
        version: increments on each commit on every rank (owner or not).
        on_add: called with the factor after every ``add`` (the reducer counts contributions to launch buckets).
    """

    def __init__(self, name: str, dim: int, blocks: int = 1, final_in: str = "backward",
                 device: Callable[[], torch.device] | None = None) -> None:
        self.name = name
        self.dim = dim
        self.blocks = blocks
        self.final_in = final_in
        self._device = device
        self.on_add: Callable[[SymmetricFactor], None] | None = None
        self.accum: Tensor | None = None
        self.count: float = 0.0
        self.value: Tensor | None = None
        self.version: int = 0
        self._backup: tuple[Tensor | None, int] | None = None

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

    def add(self, rows: Tensor, weight: float, n_examples: int) -> None:
        """Accumulate weight · rowsᵀ rows (per block) from one micro-batch.

        Args:
            rows: M × d (B = 1) or B × M × d; any float dtype, upcast to fp32 before the product.
            weight: scalar multiplying the outer-product sum (e.g. 1/|T| for KFC's G, scale² for loss scaling).
            n_examples: the number of examples the M rows came from (added to ``count``).

        Raises:
            ValueError: when the trailing dimension or block count does not match the factor.
        """
        r = rows.float()
        if r.dim() == 2:
            r = r.unsqueeze(0)
        if r.dim() != 3 or r.shape[0] != self.blocks or r.shape[2] != self.dim:
            raise ValueError(
                f"factor {self.name}: expected rows of shape {'' if self.blocks == 1 else f'{self.blocks} x '}"
                f"M x {self.dim}, got {tuple(rows.shape)}"
            )
        if self.accum is None:
            self.accum = torch.zeros(self.blocks, self.dim, self.dim, dtype=torch.float32, device=r.device)
        if self.blocks == 1:
            self.accum[0].addmm_(r[0].t(), r[0], alpha=weight)
        else:
            self.accum.baddbmm_(r.transpose(1, 2), r, alpha=weight)
        self.count += n_examples
        if self.on_add is not None:
            self.on_add(self)

    @property
    def committed(self) -> bool:
        """True once a global estimate was committed (on every rank, owner or not)."""
        return self.version > 0

    def take_local(self) -> tuple[Tensor, float]:
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
