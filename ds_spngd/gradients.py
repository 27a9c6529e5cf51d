"""Where the optimizer finds gradients and parameters: the seam that keeps ZeRO out of the curvature math (in the spirit
of Distributed Shampoo's ``distributor``).

* :class:`DenseGradients` — ZeRO stage 0 (fp32, or DeepSpeed's bf16 wrapper with fp32 clones): the optimizer's
  ``param_groups`` hold whole parameters whose ``.grad`` is the global average. Blocks are found by position.
* :class:`PartitionedGradients` — ZeRO stages 1 and 2 (and DeepSpeed's BF16_Optimizer): the optimizer's single
  parameter is this rank's flat fp32 partition; each model parameter's ``_hp_mapping`` (DeepSpeed's fragment map)
  says which slice of it lives here. A block's full gradient is rebuilt by summing zero-padded fragments over the
  ranks (all-reduce for ``comm_opt``, reduce to the block's owner for ``mem_opt``); the preconditioned result is
  written back into this rank's slice only, and momentum / weight decay stay elementwise on the partition (ZeRO's
  memory saving is kept). Chosen over preconditioning before DeepSpeed's reduction (which cannot form KL-clipping's
  Σ F̂⁻¹g·g of the *averaged* gradient) and over aligning owners with ZeRO's partitions (which cut layers anywhere).

Both present the same interface to :class:`ds_spngd.SPNGD`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ds_spngd.comm.collectives import all_reduce_sum, rank, reduce_sum, world_size
from ds_spngd.curvature.base import FisherBlock

__all__ = ["DenseGradients", "PartitionedGradients", "is_partitioned"]

Position = tuple[int, int]
BlockGrads = dict[int, list[Tensor]]


def is_partitioned(params: Sequence[torch.nn.Parameter]) -> bool:
    """True when DeepSpeed mapped these model parameters onto flat fp32 partitions (ZeRO 1/2, BF16_Optimizer)."""
    return any(hasattr(p, "_hp_mapping") for p in params)


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

    def available(self, ids: Sequence[int]) -> list[int]:
        """The blocks among ``ids`` whose every parameter has a gradient (identical on all ranks)."""
        return [i for i in ids if all(self._param(pos).grad is not None for pos in self.positions[i])]

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
            norms = torch._foreach_norm([params[k].grad for k in present], float("inf"))
            flags[present] = (~torch.isfinite(torch.stack(norms).to(device))).float()
        return flags

    def weight(self, block_index: int) -> list[Tensor]:
        """The fp32 (master) weight tensor(s) of a block that weight rescaling may scale in place: here the whole."""
        return [self._param(self.positions[block_index][0])]

    def reduce_squares(self, squares: Tensor, group: Any) -> Tensor:
        """Sum per-block squared norms computed from :meth:`weight` over the ranks holding pieces (here: none)."""
        return squares

    def momentum_numel(self) -> int:
        """Elements of the momentum buffers this rank keeps: every optimized parameter."""
        return sum(p.numel() for g in self.opt.param_groups for p in g["params"])


class PartitionedGradients:
    """ZeRO 1/2: the optimizer's one parameter is this rank's flat fp32 partition (see the module docstring).

    Args:
        optimizer: the SP-NGD optimizer, after DeepSpeed replaced its ``param_groups`` by one flat partition.
        blocks: the Fisher blocks (their ``params`` are the model's parameters, carrying ``_hp_mapping``).

    Raises:
        ValueError: more than one parameter group (DeepSpeed steps ZeRO groups one at a time, so one step could not
            see every block), or a parameter of a block without DeepSpeed's fragment map.
    """

    partitioned = True

    def __init__(self, optimizer: torch.optim.Optimizer, blocks: Sequence[FisherBlock]) -> None:
        if len(optimizer.param_groups) != 1 or len(optimizer.param_groups[0]["params"]) != 1:
            raise ValueError(
                "SP-NGD under ZeRO stage 1/2 needs a single parameter group (DeepSpeed steps ZeRO's groups one at a "
                f"time); got {len(optimizer.param_groups)} groups. Pass model.parameters() as one group.")
        for b in blocks:
            for p in b.params:
                if not hasattr(p, "_hp_mapping"):
                    raise ValueError(f"{b.name}: parameter without DeepSpeed's ZeRO fragment map (_hp_mapping)")
        self.opt = optimizer
        self.blocks = blocks

    @property
    def flat(self) -> Tensor:
        return self.opt.param_groups[0]["params"][0]  # type: ignore[no-any-return]

    def _fragments(self, p: Tensor) -> tuple[int, int, int] | None:
        """(start in the flat partition, start in the flattened parameter, length) of p's piece here, or None."""
        m = getattr(p, "_hp_mapping", None)
        if m is None:
            return None
        return int(m.hp_fragment_address.start), int(m.lp_fragment_address.start), int(m.hp_fragment_address.numel)

    def block_grads(self, ids: Sequence[int], owners: Sequence[int] | None, group: Any) -> tuple[BlockGrads, int]:
        """Rebuild the full fp32 gradients of blocks ``ids`` from every rank's fragments.

        Args:
            ids: block indices (identical on all ranks).
            owners: None = every rank receives every block (one all-reduce); else the owner group rank per block
                index, and each owner receives its blocks only (one reduce per owner).
            group: data-parallel process group.

        Returns:
            (block index → full gradients, on the ranks that received them; bytes handed to collectives).
        """
        grad = self.flat.grad
        if grad is None:
            return {}, 0
        plan = [(None, list(ids))] if owners is None else [
            (o, [i for i in ids if owners[i] == o]) for o in range(world_size(group))]
        out: dict[int, list[Tensor]] = {}
        sent = 0
        me = rank(group)
        for dst, members in plan:
            if not members:
                continue
            params = [p for i in members for p in self.blocks[i].params]
            buf = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=grad.device)
            off = 0
            for p in params:
                frag = self._fragments(p)
                if frag is not None:
                    hp, lp, n = frag
                    buf[off + lp : off + lp + n] = grad[hp : hp + n].float()
                off += p.numel()
            if dst is None:
                all_reduce_sum(buf, group)
            else:
                reduce_sum(buf, dst, group)
            sent += buf.numel() * 4 if world_size(group) > 1 else 0
            if dst is not None and dst != me and world_size(group) > 1:
                continue
            off = 0
            for i in members:
                gs = []
                for p in self.blocks[i].params:
                    gs.append(buf[off : off + p.numel()].view_as(p))
                    off += p.numel()
                out[i] = gs
        return out, sent

    def available(self, ids: Sequence[int]) -> list[int]:
        """All of ``ids`` when the partition has a gradient this step (ZeRO sets it on every rank), else none."""
        return list(ids) if self.flat.grad is not None else []

    def directions(self, nat: dict[int, list[Tensor]]) -> dict[Position, Tensor]:
        """The flat partition's direction: its gradient, with every block fragment replaced by F̂⁻¹g's slice."""
        grad = self.flat.grad
        if grad is None:
            return {}
        d = grad.float().clone()
        for i, vs in nat.items():
            for p, v in zip(self.blocks[i].params, vs, strict=True):
                frag = self._fragments(p)
                if frag is not None:
                    hp, lp, n = frag
                    d[hp : hp + n] = v.reshape(-1)[lp : lp + n]
        return {(0, 0): d}

    @property
    def names(self) -> list[str]:
        """What each entry of :meth:`nonfinite_flags` is about: the blocks, then the whole partition."""
        return [b.name for b in self.blocks] + ["a parameter without a Fisher block (ZeRO partition)"]

    def nonfinite_flags(self, device: torch.device) -> Tensor:
        """Per block, 1.0 where this rank's fragment of its gradient holds NaN/Inf, then one entry for the whole
        partition; on ``device``, no host sync. Summed over ranks by the step's agreement, so a NaN in any rank's
        partition is seen by all."""
        flags = torch.zeros(len(self.blocks) + 1, device=device)
        grad = self.flat.grad
        if grad is None:
            return flags
        frags: list[Tensor] = []
        owner: list[int] = []
        for i, b in enumerate(self.blocks):
            for p in b.params:
                frag = self._fragments(p)
                if frag is not None:
                    frags.append(grad[frag[0] : frag[0] + frag[2]])
                    owner.append(i)
        norms = torch._foreach_norm([*frags, grad], float("inf"))
        bad = (~torch.isfinite(torch.stack(norms).to(device))).float()
        flags[-1] = bad[-1]
        if owner:  # a block's weight and bias fragments: flag the block once
            flags[:-1].index_add_(0, torch.tensor(owner, device=device), bad[:-1]).clamp_(max=1.0)
        return flags

    def weight(self, block_index: int) -> list[Tensor]:
        """This rank's fp32 master fragment of the block's weight (empty when it holds none)."""
        p = self.blocks[block_index].params[0]
        frag = self._fragments(p)
        if frag is None:
            return []
        hp, _, n = frag
        return [self.flat.data[hp : hp + n]]

    def reduce_squares(self, squares: Tensor, group: Any) -> Tensor:
        """Sum the per-block squared norms of the fragments over the ranks (one small all-reduce)."""
        return all_reduce_sum(squares, group)  # type: ignore[no-any-return]

    def momentum_numel(self) -> int:
        """Elements of the momentum buffer(s) this rank keeps: its partition."""
        return int(self.flat.numel())
