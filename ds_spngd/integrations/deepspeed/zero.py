"""ZeRO stages 1, 2 and 3: SP-NGD's gradient access over DeepSpeed's flat fp32 partitions, and the glue that
partitioning needs.

* :class:`PartitionedGradients` implements :class:`ds_spngd.gradients.GradientAccess` (the seam that keeps ZeRO out
  of the curvature math; the stage-0 counterpart, :class:`ds_spngd.gradients.DenseGradients`, stays with the
  optimizer) over a :class:`ds_spngd.integrations.deepspeed.zero_layout.ZeroLayout`: per parameter group the flat
  fp32 partitions this rank steps (ZeRO 1/2: one per group; ZeRO 3: one per sub-group), per model parameter its
  fragment here and its full shape. A block's full gradient is rebuilt from the ranks' fragments: for ``comm_opt``
  by all-gathering the partitions (ZeRO 1/2: where each parameter is one range of them, :mod:`ds_spngd.comm.
  fragments`; ZeRO 3: each parameter is W equal pieces at one offset of every rank's partition), else by summing
  zero-padded fragments (all-reduce; reduce to the block's owner for ``mem_opt``); the
  preconditioned result is written back into this rank's slices only, and momentum / weight decay stay elementwise
  on the partitions with each group's own lr, momentum and weight_decay (ZeRO's memory saving is kept). At ZeRO 3
  no rank holds a whole weight outside forward / backward; the gradient is assembled on the rank(s) that precondition
  the block, as at ZeRO 1/2. Chosen over preconditioning before DeepSpeed's reduction (which cannot form
  KL-clipping's Σ F̂⁻¹g·g of the *averaged* gradient) and over aligning owners with ZeRO's partitions (which cut
  layers anywhere).
* DeepSpeed steps one flat partition per ``step()`` call; :mod:`ds_spngd.integrations.deepspeed.zero_steps` turns
  those calls into one SP-NGD step (:class:`~ds_spngd.integrations.deepspeed.zero_steps.GroupByGroup`,
  :class:`~ds_spngd.integrations.deepspeed.zero_steps.FlatByFlat`).
* :func:`glue_zero_partitions` (called by :func:`ds_spngd.integrations.deepspeed.engine.attach`) installs the
  write-back of the partitions DeepSpeed stepped before the last one, and returns the :class:`StateLinks` that
  re-link DeepSpeed's ZeRO-1/2 optimizer-state fragments to SP-NGD's momentum.

Seam: none. DeepSpeed's public ``deepspeed.utils.safe_get_full_grad`` & co. are per-parameter collectives returning
full tensors, so this module reads ZeRO's internals; each is an entry of
:data:`ds_spngd.integrations.deepspeed.patches.PATCHES`. KL-clipping's η is ``param_groups[0]["lr"]``, as at stage 0.
DeepSpeed drops empty groups (``engine.py`` l. 2348), and so does :class:`ds_spngd.SPNGD`, so group indices agree.
The optimizer-state fragments DeepSpeed links after the first group's call (ZeRO 1/2) are linked again once the
momentum exists (:class:`StateLinks`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ds_spngd.comm.agreement import max_abs
from ds_spngd.comm.collectives import all_reduce_sum, rank, reduce_sum, world_size
from ds_spngd.comm.fragments import FlatLayout, exchange_layout, gather_flats
from ds_spngd.curvature.base import FisherBlock
from ds_spngd.gradients import BlockGrads, Groups, Position
from ds_spngd.integrations.deepspeed.zero_layout import ZeroLayout, is_zero3, stage3_layout, stage12_layout
from ds_spngd.integrations.deepspeed.zero_steps import FlatByFlat, GroupByGroup

__all__ = ["PartitionedGradients", "StateLinks", "glue_zero_partitions", "is_partitioned", "partitioned_gradients"]


def is_partitioned(params: Sequence[Tensor]) -> bool:
    """True when DeepSpeed mapped these model parameters onto flat fp32 partitions (ZeRO 1/2, BF16_Optimizer,
    ZeRO 3)."""
    return any(hasattr(p, "_hp_mapping") for p in params) or is_zero3(params)


def partitioned_gradients(wrapper: Any, optimizer: torch.optim.Optimizer, blocks: Sequence[FisherBlock],
                          params: Sequence[Tensor]) -> PartitionedGradients | None:
    """The gradient access for the engine's optimizer ``wrapper``: None at stage 0 (whole parameters), else
    :class:`PartitionedGradients` over the ZeRO 1/2 or ZeRO 3 layout of the model ``params``."""
    if not is_partitioned(params):
        return None
    if is_zero3(params):
        return PartitionedGradients(optimizer, blocks, stage3_layout(wrapper, [p for b in blocks for p in b.params]))
    return PartitionedGradients(optimizer, blocks)


class PartitionedGradients:
    """ZeRO 1/2/3: gradients and directions over this rank's flat fp32 partitions (see the module docstring).

    Args:
        optimizer: the SP-NGD optimizer, after DeepSpeed replaced each group's parameters by flat partitions.
        blocks: the Fisher blocks (their ``params`` are the model's parameters).
        layout: where the partitions and fragments are; default :func:`~ds_spngd.integrations.deepspeed.zero_layout.
            stage12_layout` of ``optimizer`` (ZeRO 1/2).

    Attributes:
        write_back: ``write_back(k)`` copies the k-th stepped partition into DeepSpeed's low-precision partition;
            needed when DeepSpeed steps the partitions one at a time (set by :func:`glue_zero_partitions`).
        gather: use the all-gather of the partitions where it applies (default); False forces the all-reduce of
            zero-padded fragments (the general path, kept as the reference the all-gather is tested against).

    Raises:
        ValueError: (ZeRO 1/2) a group that does not hold exactly one flat partition, or a parameter of a block
            without DeepSpeed's fragment map.
    """

    partitioned = True

    def __init__(self, optimizer: torch.optim.Optimizer, blocks: Sequence[FisherBlock],
                 layout: ZeroLayout | None = None) -> None:
        self.opt = optimizer
        self.blocks = blocks
        self.layout = layout if layout is not None else stage12_layout(optimizer, [p for b in blocks for p in b.params])
        flats = self.layout.flats
        self.pattern: GroupByGroup | FlatByFlat = (
            FlatByFlat(flats, self.layout.order) if self.layout.stage == 3 else GroupByGroup([f[0] for f in flats]))
        self.gather = True
        self._index_cache: tuple[tuple[tuple[int, ...], torch.device], Tensor] | None = None
        self._gather_layout: tuple[Any, FlatLayout | None] | None = None  # (group, where each block parameter lies)

    @property
    def write_back(self) -> Callable[[int], None] | None:
        return self.pattern.write_back

    @write_back.setter
    def write_back(self, fn: Callable[[int], None] | None) -> None:
        self.pattern.write_back = fn

    # ---- DeepSpeed's one-partition-at-a-time calls (:mod:`.zero_steps`) -------------------------------------------
    def begin_step(self, groups: Groups) -> Groups | None:
        """Called at the start of every ``step()`` with the optimizer's current ``param_groups``: the groups the step
        updates now, or None when this call only keeps its partition's gradient for the step on the last call.

        Raises:
            RuntimeError: DeepSpeed stepped the partitions in another pattern than the one this relies on, or no
                :attr:`write_back` is installed; raised on every rank alike.
        """
        return self.pattern.begin(groups)

    def end_step(self, completed: bool) -> None:
        """After the step :meth:`begin_step` released: write the earlier partitions back (when the step completed,
        applied or skipped) and drop the gradients kept for them, as DeepSpeed had."""
        self.pattern.end(completed)

    # ---- gradients ------------------------------------------------------------------------------------------------
    def _grads(self) -> dict[Position, Tensor] | None:
        """Every partition's flat gradient, or None when one is missing (ZeRO sets all of them on every rank, so this
        is identical on all ranks)."""
        grads = {pos: self.layout.flat(pos).grad for pos in self.layout.positions}
        return None if any(g is None for g in grads.values()) else grads  # type: ignore[return-value]

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
        grads = self._grads()
        if grads is None:
            return {}, 0
        if self.gather and owners is None and ids and world_size(group) > 1:
            gathered = self._gathered(ids, grads, group)
            if gathered is not None:
                return gathered
        plan = [(None, list(ids))] if owners is None else [
            (o, [i for i in ids if owners[i] == o]) for o in range(world_size(group))]
        out: dict[int, list[Tensor]] = {}
        sent = 0
        me, lay = rank(group), self.layout
        for dst, members in plan:
            if not members:
                continue
            params = [p for i in members for p in self.blocks[i].params]
            buf = torch.zeros(sum(lay.numel(p) for p in params), dtype=torch.float32, device=self._device(grads))
            off = 0
            for p in params:
                frag = lay.fragment(p)
                if frag is not None:
                    pos, hp, lp, n = frag
                    buf[off + lp : off + lp + n] = grads[pos][hp : hp + n].float()
                off += lay.numel(p)
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
                    gs.append(buf[off : off + lay.numel(p)].view(lay.shape(p)))
                    off += lay.numel(p)
                out[i] = gs
        return out, sent

    @staticmethod
    def _device(grads: dict[Position, Tensor]) -> torch.device:
        return next(iter(grads.values())).device

    def _gathered(self, ids: Sequence[int], grads: dict[Position, Tensor],
                  group: Any) -> tuple[BlockGrads, int] | None:
        """Every rank receives every block: the blocks' gradients as views of the all-gathered partitions
        (:mod:`ds_spngd.comm.fragments`: half an all-reduce's traffic), or None where that does not apply — ZeRO 3
        (a parameter's pieces are not one range of the gathered flats), the layout (learned once, a collective)
        leaves a parameter out, or the blocks asked for are under half the partitions (the all-reduce then moves
        less). Every condition is identical on every rank."""
        lay = self.layout
        if lay.stage == 3:
            return self._gathered_pieces(ids, grads, group)
        if self._gather_layout is None or self._gather_layout[0] is not group:
            keys = {(i, k): p for i, b in enumerate(self.blocks) for k, p in enumerate(b.params)}
            mine = {key: (f[0][0], f[1], f[2], f[3]) for key, p in keys.items() if (f := lay.fragment(p)) is not None}
            sizes = [lay.flat((gi, 0)).numel() for gi in range(len(lay.flats))]
            self._gather_layout = (group, exchange_layout(sizes, mine, {k: lay.numel(p) for k, p in keys.items()},
                                                          group))
        layout = self._gather_layout[1]
        params = [((i, k), p) for i in ids for k, p in enumerate(self.blocks[i].params)]
        if layout is None or any(key not in layout.offsets for key, _ in params) or \
                2 * sum(lay.numel(p) for _, p in params) < world_size(group) * sum(layout.sizes):
            return None
        full = gather_flats([grads[(gi, 0)].float() for gi in range(len(lay.flats))], group)
        views = {key: full[layout.offsets[key][0]].narrow(0, layout.offsets[key][1], lay.numel(p)).view(lay.shape(p))
                 for key, p in params}
        return {i: [views[(i, k)] for k in range(len(self.blocks[i].params))] for i in ids}, \
            sum(f.numel() for f in full) * 4

    def _gathered_pieces(self, ids: Sequence[int], grads: dict[Position, Tensor],
                          group: Any) -> tuple[BlockGrads, int] | None:
        """ZeRO 3, every rank receives every block: all-gather the sub-groups' partitions (equal lengths on all ranks)
        and read each parameter as its W pieces at one offset, in rank order, trimmed to its size (a copy); None when
        the blocks asked for are under half the partitions (the all-reduce then moves less)."""
        lay, w = self.layout, world_size(group)
        params = [p for i in ids for p in self.blocks[i].params]
        if 2 * sum(lay.numel(p) for p in params) < w * sum(g.numel() for g in grads.values()):
            return None
        positions = list(grads)
        full = dict(zip(positions, gather_flats([grads[pos].float() for pos in positions], group), strict=True))
        out: BlockGrads = {}
        for i in ids:
            gs = []
            for p in self.blocks[i].params:
                pos, offset, piece = lay.pieces[id(p)]
                rows = full[pos].view(w, -1)[:, offset : offset + piece]
                gs.append(rows.reshape(-1)[: lay.numel(p)].view(lay.shape(p)))
            out[i] = gs
        return out, sum(f.numel() for f in full.values()) * 4

    def available(self, ids: Sequence[int]) -> list[int]:
        """All of ``ids`` when every partition has a gradient this step (ZeRO sets them on every rank), else none."""
        return list(ids) if self._grads() is not None else []

    def shapes(self, block_index: int) -> list[tuple[int, ...]]:
        """The full shapes of a block's parameters (from the layout: ZeRO 3 empties them between forward passes)."""
        return [tuple(self.layout.shape(p)) for p in self.blocks[block_index].params]

    def directions(self, nat: dict[int, list[Tensor]]) -> dict[Position, Tensor]:
        """Per partition holding a block fragment: its gradient with every block fragment replaced by F̂⁻¹g's slice
        (the other partitions keep their gradient)."""
        grads = self._grads()
        if grads is None:
            return {}
        out: dict[Position, Tensor] = {}
        for i, vs in nat.items():
            for p, v in zip(self.blocks[i].params, vs, strict=True):
                frag = self.layout.fragment(p)
                if frag is not None:
                    pos, hp, lp, n = frag
                    if pos not in out:
                        out[pos] = grads[pos].float().clone()
                    out[pos][hp : hp + n] = v.reshape(-1)[lp : lp + n]
        return out

    def final_mask(self, ids: Sequence[int]) -> dict[Position, Tensor | None]:
        """Per partition holding a fragment of blocks ``ids``: a bool mask of those fragments' elements."""
        grads = self._grads()
        if grads is None:
            return {}
        out: dict[Position, Tensor | None] = {}
        for i in ids:
            for p in self.blocks[i].params:
                frag = self.layout.fragment(p)
                if frag is not None:
                    pos, hp, _, n = frag
                    mask = out.get(pos)
                    if mask is None:
                        mask = out[pos] = torch.zeros(grads[pos].shape, dtype=torch.bool, device=grads[pos].device)
                    mask[hp : hp + n] = True
        return out

    @property
    def names(self) -> list[str]:
        """What each entry of :meth:`nonfinite_flags` is about: the blocks, then the whole partition."""
        return [b.name for b in self.blocks] + ["a parameter without a Fisher block (ZeRO partition)"]

    def nonfinite_flags(self, device: torch.device) -> Tensor:
        """Per block, 1.0 where this rank's fragment of its gradient holds NaN/Inf, then one entry for the whole
        partition (every group's); on ``device``, no host sync. Summed over ranks by the step's agreement, so a NaN in
        any rank's partition is seen by all."""
        flags = torch.zeros(len(self.blocks) + 1, device=device)
        present = {pos: g for pos in self.layout.positions if (g := self.layout.flat(pos).grad) is not None}
        if not present:
            return flags
        frags: list[Tensor] = []
        owner: list[int] = []
        for i, b in enumerate(self.blocks):
            for p in b.params:
                frag = self.layout.fragment(p)
                if frag is not None and frag[0] in present:
                    frags.append(present[frag[0]][frag[1] : frag[1] + frag[3]])
                    owner.append(i)
        norms = max_abs([*frags, *present.values()])
        bad = (~torch.isfinite(torch.stack(norms).to(device))).float()
        flags[-1] = bad[len(frags) :].max()
        if owner:  # a block's weight and bias fragments: flag the block once
            flags[:-1].index_add_(0, self._owner_index(owner, device), bad[: len(frags)]).clamp_(max=1.0)
        return flags

    def _owner_index(self, owner: list[int], device: torch.device) -> Tensor:
        """``owner`` on ``device``, kept while it is the same: no upload per step (on CUDA, a stream sync each)."""
        key = (tuple(owner), device)
        if self._index_cache is None or self._index_cache[0] != key:
            self._index_cache = (key, torch.tensor(owner, device=device))
        return self._index_cache[1]

    def weight(self, block_index: int) -> list[Tensor]:
        """This rank's fp32 master fragment of the block's weight (empty when it holds none)."""
        frag = self.layout.fragment(self.blocks[block_index].params[0])
        if frag is None:
            return []
        pos, hp, _, n = frag
        return [self.layout.flat(pos).data[hp : hp + n]]

    def reduce_squares(self, squares: Tensor, group: Any) -> Tensor:
        """Sum the per-block squared norms of the fragments over the ranks (one small all-reduce)."""
        return all_reduce_sum(squares, group)  # type: ignore[no-any-return]

    def momentum_numel(self) -> int:
        """Elements of the momentum buffers this rank keeps: the partitions of the groups with momentum ≠ 0 (read
        from the layout: ZeRO 3 empties the groups' lists between steps)."""
        return sum(int(f.numel()) for g, fl in zip(self.opt.param_groups, self.layout.flats, strict=False)
                   if float(g["momentum"]) != 0.0 for f in fl)


# DeepSpeedZeroOptimizer's attributes the ZeRO glue reads (PATCHES: wrapper.<name>)
_ZERO_ATTRIBUTES = ("single_partition_of_fp32_groups", "parallel_partitioned_bit16_groups", "real_dp_process_group",
                    "bit16_groups")


class StateLinks:
    """Re-links each parameter's ``_hp_mapping.optim_fragment`` (what ``deepspeed.utils.
    safe_get_full_optimizer_state`` reads) to SP-NGD's momentum.

    DeepSpeed links them once, right after the first group's ``step()`` call (stage_1_and_2.py l. 2987, 852–857), and
    not again after loading a checkpoint; SP-NGD creates its momentum buffers on the last group's call (or not at all
    on a skipped first step). :meth:`after_step` links them after the first applied step, and again after the first
    applied step that follows each :meth:`invalidate` (a ``load_checkpoint``).
    """

    def __init__(self, wrapper: Any, optimizer: torch.optim.Optimizer) -> None:
        self.wrapper, self.optimizer = wrapper, optimizer
        self.stale = True

    def after_step(self, applied: bool) -> None:
        """After a boundary step: link again when the links are stale and the step was applied."""
        if not (self.stale and applied):
            return
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        for lp_params, flat in zip(self.wrapper.bit16_groups, self.wrapper.single_partition_of_fp32_groups,
                                   strict=True):
            lazy_init_hp_params_optimizer_state(lp_params, flat, self.optimizer.state)
        self.stale = False

    def invalidate(self) -> None:
        """The optimizer state was replaced (a checkpoint was loaded): link again after the next applied step."""
        self.stale = True


def glue_zero_partitions(wrapper: Any, optimizer: torch.optim.Optimizer,
                         grads: PartitionedGradients | None) -> StateLinks | None:
    """ZeRO glue: install ``grads.write_back`` (DeepSpeed's own fp32 → low-precision copy after each partition's
    step — ZeRO 1/2: stage_1_and_2.py l. 3143–3145; ZeRO 3: ``_reassign_or_swap_out_partitioned_parameters``,
    stage3.py l. 2924 — which SP-NGD's deferred step must redo for the earlier partitions) and, at ZeRO 1/2, return
    the :class:`StateLinks` of the optimizer-state fragments.

    Returns:
        None when ``grads`` is None (stage 0), at ZeRO 3 (its ``safe_get_full_optimizer_state`` reads
        ``optimizer.state[flat]`` directly), or when the wrapper is not DeepSpeedZeroOptimizer (BF16_Optimizer steps
        every group in one call and links after it).
    """
    if grads is not None and grads.layout.stage == 3:
        grads.write_back = wrapper._reassign_or_swap_out_partitioned_parameters
        return None
    if grads is None or not all(hasattr(wrapper, a) for a in _ZERO_ATTRIBUTES):
        return None

    def write_back(i: int) -> None:
        part = rank(wrapper.real_dp_process_group[i])
        wrapper.parallel_partitioned_bit16_groups[i][part].data.copy_(wrapper.single_partition_of_fp32_groups[i].data)

    grads.write_back = write_back
    return StateLinks(wrapper, optimizer)
