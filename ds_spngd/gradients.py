"""Where the optimizer finds its gradients and parameters: the seam that keeps ZeRO out of the curvature math (in the
spirit of Distributed Shampoo's ``distributor``).

:class:`GradientAccess` is the interface the step uses; :class:`DenseGradients` implements it for whole parameters
(ZeRO stage 0, or any plain ``torch.optim`` use): the optimizer's ``param_groups`` hold whole parameters whose
``.grad`` is the global average, and blocks are found by position. Engine integrations provide other
implementations — DeepSpeed's ZeRO 1/2/3 flat partitions live in :mod:`ds_spngd.integrations.deepspeed.zero` — and
hand them to :meth:`ds_spngd.SPNGD.setup_distributed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from ds_spngd.comm.agreement import max_abs
from ds_spngd.curvature.base import FisherBlock

__all__ = ["BlockGrads", "DenseGradients", "GradientAccess", "Groups", "Position"]

Position = tuple[int, int]
BlockGrads = dict[int, list[Tensor]]
Groups = list[dict[str, Any]]


class GradientAccess(Protocol):
    """How one SP-NGD step reads gradients and writes directions (stage 0: :class:`DenseGradients`; ZeRO 1/2/3:
    :class:`ds_spngd.integrations.deepspeed.zero.PartitionedGradients`).

    Attributes:
        partitioned: True when the gradients are flat partitions (no rank holds a whole local gradient).
    """

    partitioned: bool

    def begin_step(self, groups: Groups) -> Groups | None:
        """The groups this ``step()`` call updates, or None when the call only keeps its group's gradient."""

    def end_step(self, completed: bool) -> None:
        """After the step :meth:`begin_step` released (``completed``: applied or skipped without an exception)."""

    def block_grads(self, ids: Sequence[int], owners: Sequence[int] | None, group: Any) -> tuple[BlockGrads, int]:
        """Full averaged gradients of blocks ``ids`` (on every rank, or on ``owners[i]``), and bytes communicated."""

    def directions(self, nat: dict[int, list[Tensor]]) -> dict[Position, Tensor]:
        """Per optimizer parameter position, the update direction before weight decay."""

    def final_mask(self, ids: Sequence[int]) -> dict[Position, Tensor | None]:
        """The positions holding (pieces of) blocks ``ids``: None = the whole position belongs to them, else a bool
        mask of its elements that do (a ZeRO partition mixes blocks)."""

    def available(self, ids: Sequence[int]) -> list[int]:
        """The blocks among ``ids`` whose gradients exist this step (identical on every rank)."""

    def shapes(self, block_index: int) -> list[tuple[int, ...]]:
        """The full shapes of a block's parameters (ZeRO 3 empties them between forward passes)."""

    @property
    def names(self) -> list[str]:
        """What each entry of :meth:`nonfinite_flags` is about."""

    def nonfinite_flags(self, device: torch.device) -> Tensor:
        """1.0 per entry of :attr:`names` whose gradient holds NaN/Inf (no host sync)."""

    def weight(self, block_index: int) -> list[Tensor]:
        """The fp32 weight tensor(s) of a block that weight rescaling may scale in place."""

    def reduce_squares(self, squares: Tensor, group: Any) -> Tensor:
        """Sum per-block squared norms of :meth:`weight` over the ranks holding pieces."""

    def momentum_numel(self) -> int:
        """Elements of the momentum buffers this rank keeps."""


class DenseGradients:
    """Stage 0: whole parameters in the optimizer's groups, found by position.

    Args:
        optimizer: the SP-NGD optimizer (its live ``param_groups`` are read at every call).
        positions: per block, the (group, index) of each of its parameters.
        blocks: the Fisher blocks.
        names: the optimizer's parameters' names in ``param_groups`` order (for error messages).
    """

    partitioned = False

    def __init__(self, optimizer: torch.optim.Optimizer, positions: list[list[Position]],
                 blocks: Sequence[FisherBlock] = (), names: Sequence[str] = ()) -> None:
        self.opt = optimizer
        self.positions = positions
        self.blocks = blocks
        self._names = list(names)

    def begin_step(self, groups: Groups) -> Groups | None:
        """The groups one SP-NGD step updates: here every group, on every call (stage 0 steps them together)."""
        return groups

    def end_step(self, completed: bool) -> None:
        """Nothing to undo at stage 0."""

    def _param(self, pos: Position) -> Tensor:
        gi, pi = pos
        return self.opt.param_groups[gi]["params"][pi]  # type: ignore[no-any-return]

    def block_grads(self, ids: Sequence[int], owners: Sequence[int] | None, group: Any) -> tuple[BlockGrads, int]:
        """Full gradients of the blocks ``ids`` (here: every rank has them already; no communication).

        Returns:
            (block index → gradients in the block's parameter order, bytes communicated = 0). A block with a missing
            gradient is left out.
        """
        out = {}
        for i in ids:
            grads = [self._param(pos).grad for pos in self.positions[i]]
            if all(g is not None for g in grads):
                out[i] = [g for g in grads if g is not None]
        return out, 0

    def directions(self, nat: dict[int, list[Tensor]]) -> dict[Position, Tensor]:
        """Per optimizer parameter, the update direction before weight decay (F̂⁻¹g for block parameters)."""
        out: dict[Position, Tensor] = {}
        for i, vs in nat.items():
            out.update(zip(self.positions[i], vs, strict=True))
        return out

    def final_mask(self, ids: Sequence[int]) -> dict[Position, Tensor | None]:
        """Every position of blocks ``ids``, whole (a parameter belongs to one block)."""
        return {pos: None for i in ids for pos in self.positions[i]}

    def available(self, ids: Sequence[int]) -> list[int]:
        """The blocks among ``ids`` whose every parameter has a gradient (identical on all ranks)."""
        return [i for i in ids if all(self._param(pos).grad is not None for pos in self.positions[i])]

    def shapes(self, block_index: int) -> list[tuple[int, ...]]:
        """The shapes of a block's parameters (whole parameters here)."""
        return [tuple(p.shape) for p in self.blocks[block_index].params]

    @property
    def names(self) -> list[str]:
        """What each entry of :meth:`nonfinite_flags` is about: the parameters' names, ``param_groups`` order."""
        n = sum(len(g["params"]) for g in self.opt.param_groups)
        return self._names if len(self._names) == n else [
            f"param_groups[{gi}][{pi}]" for gi, g in enumerate(self.opt.param_groups) for pi in range(len(g["params"]))]

    def nonfinite_flags(self, device: torch.device) -> Tensor:
        """Per optimizer parameter (``param_groups`` order): 1.0 where its gradient holds NaN/Inf, on ``device``.

        No host sync: the flags join the step's agreement (:mod:`ds_spngd.comm.agreement`). A parameter without a
        gradient gets 0. (Gradients are identical on every rank at stage 0; the agreement costs nothing extra.)
        """
        params = [p for g in self.opt.param_groups for p in g["params"]]
        present = [k for k, p in enumerate(params) if p.grad is not None]
        flags = torch.zeros(len(params), device=device)
        if present:
            bad = (~torch.isfinite(torch.stack(max_abs([params[k].grad for k in present])).to(device))).float()
            if len(present) == len(params):  # the usual case: no index to upload to the device
                return bad
            flags[present] = bad
        return flags

    def weight(self, block_index: int) -> list[Tensor]:
        """The fp32 (master) weight tensor(s) of a block that weight rescaling may scale in place: here the whole."""
        return [self._param(self.positions[block_index][0])]

    def reduce_squares(self, squares: Tensor, group: Any) -> Tensor:
        """Sum per-block squared norms computed from :meth:`weight` over the ranks holding pieces (here: none)."""
        return squares

    def momentum_numel(self) -> int:
        """Elements of the momentum buffers this rank keeps: every parameter of the groups with momentum ≠ 0."""
        return sum(p.numel() for g in self.opt.param_groups if float(g["momentum"]) != 0.0 for p in g["params"])


