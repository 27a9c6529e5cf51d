"""ZeRO stages 1 and 2 (DeepSpeedZeroOptimizer, and DeepSpeed's BF16_Optimizer): SP-NGD's gradient access over
DeepSpeed's flat fp32 partitions, and the two pieces of glue that partitioning needs.

* :class:`PartitionedGradients` implements :class:`ds_spngd.gradients.GradientAccess` (the seam that keeps ZeRO out
  of the curvature math; the stage-0 counterpart, :class:`ds_spngd.gradients.DenseGradients`, stays with the
  optimizer). Each parameter group holds one parameter, this rank's flat fp32 partition of the group; each model
  parameter's ``_hp_mapping`` (DeepSpeed's fragment map) says which group (``param_group_index``) and which slice of
  its partition lives here. A block's full gradient is rebuilt from the ranks' fragments: for ``comm_opt`` by
  all-gathering the partitions, where each parameter is one range (:mod:`ds_spngd.comm.fragments`), else by summing
  zero-padded fragments (all-reduce; reduce to the block's owner for ``mem_opt``); the preconditioned result is written
  back into this rank's slices only, and momentum / weight decay stay elementwise on the partitions with each group's
  own lr, momentum and weight_decay (ZeRO's memory saving is kept). Chosen over preconditioning before DeepSpeed's
  reduction (which cannot form KL-clipping's Σ F̂⁻¹g·g of the *averaged* gradient) and over aligning owners with
  ZeRO's partitions (which cut layers anywhere).
* :func:`glue_zero_partitions` (called by :func:`ds_spngd.integrations.deepspeed.engine.attach`) installs the
  write-back of the groups DeepSpeed stepped before the last one, and returns the :class:`StateLinks` that re-link
  DeepSpeed's optimizer-state fragments to SP-NGD's momentum.

Seam: none. DeepSpeed's public ``deepspeed.utils.safe_get_full_grad`` & co. are per-parameter collectives returning
full tensors, so this module reads ZeRO's internals; each is an entry of
:data:`ds_spngd.integrations.deepspeed.patches.PATCHES` (``param._hp_mapping``, ``wrapper.single_partition_of_fp32_
groups``, ``wrapper.parallel_partitioned_bit16_groups``, ``wrapper.real_dp_process_group``, ``wrapper.bit16_groups``,
``deepspeed.utils.lazy_init_hp_params_optimizer_state``, ``wrapper._optimizer_step``).

Several parameter groups under ZeRO 1/2 (decay / no-decay recipes; a block's weight and bias may sit in different
groups). How DeepSpeed 0.19.8 calls ``step()`` (``deepspeed/runtime/zero/stage_1_and_2.py``):

* ``DeepSpeedZeroOptimizer.step`` (l. 3013) first decides overflow / the global norm for all groups (l. 3027–3068;
  on overflow it returns before any group is stepped), then loops over the groups in order (l. 3075). For group i it
  builds the flat gradient partition (l. 3104–3119: a fresh tensor), sets ``single_partition_of_fp32_groups[i].grad``
  (l. 3126), unscales / clips it (l. 3133), calls ``_optimizer_step(i)`` (l. 3139), sets ``.grad = None`` (l. 3141)
  and copies the fp32 partition into the low-precision partition (l. 3143–3145). Only after the loop are the
  partitions all-gathered (l. 3155).
* ``_optimizer_step(i)`` (l. 2967–2987) narrows ``self.optimizer.param_groups`` to ``[original_param_groups[i]]``,
  calls our ``step()`` once, restores the list, then links the optimizer-state fragments once
  (``_lazy_init_hp_params_optimizer_state``, l. 852–857).

So on group i's call, groups < i already lost their gradient and groups > i have none yet: no single call sees every
block, and doing the whole step on the first call is impossible. Design: **defer to the last group's call**. Each
earlier call only keeps a copy of its group's gradient (:meth:`PartitionedGradients.begin_step`, checked to arrive in
order 0, 1, …); the last call restores the full ``param_groups`` and the kept gradients and runs SP-NGD's whole step
once — one agreement, inversion, preconditioning of every block, KL-clipping over all blocks, each group's
elementwise update — then copies the earlier groups' updated fp32 partitions into DeepSpeed's low-precision
partitions (the copy DeepSpeed made right after their no-op calls, l. 3143–3145; :attr:`PartitionedGradients.
write_back`, installed by :func:`glue_zero_partitions`), before DeepSpeed's all-gather. Every rank makes the
same calls in the same order, so the collectives stay at fixed places; momentum lives in ``state[partition]`` per
group as before. DeepSpeed's ``BF16_Optimizer`` (bf16, ZeRO 1, fp32 gradient accumulation; ``bf16_optimizer.py``
l. 414–431) and stage 0 call ``step()`` once with every group, which needs nothing special. DeepSpeed drops empty
groups (``engine.py`` l. 2348), and so does :class:`ds_spngd.SPNGD`, so group indices agree.

Costs and choices: the kept gradients are copies (one copy of the earlier groups' partitions per step; DeepSpeed
frees its own right after each call, so the peak is the gradient partitions of all groups, as with one group), which
keeps them valid whatever buffer DeepSpeed builds them in. KL-clipping's η is ``param_groups[0]["lr"]``, as at stage
0. Rejected: wrapping DeepSpeed's group loop from ``attach`` (it would re-implement ``_optimizer_step``'s branches —
torch autocast GradScaler, ZenFlow, CPU offload — and DeepSpeed's fp32 → low-precision copies); merging the groups
into one for DeepSpeed (schedulers set each group's lr, ratios between groups would be lost). The optimizer-state
fragments DeepSpeed links after the first group's call are linked again once the momentum exists
(:class:`StateLinks`).
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

__all__ = ["PartitionedGradients", "StateLinks", "glue_zero_partitions", "is_partitioned"]


def is_partitioned(params: Sequence[Tensor]) -> bool:
    """True when DeepSpeed mapped these model parameters onto flat fp32 partitions (ZeRO 1/2, BF16_Optimizer)."""
    return any(hasattr(p, "_hp_mapping") for p in params)


class PartitionedGradients:
    """ZeRO 1/2: each parameter group holds one parameter, this rank's flat fp32 partition of the group (see the module
    docstring, also for how several groups are stepped).

    Args:
        optimizer: the SP-NGD optimizer, after DeepSpeed replaced each group's parameters by its flat partition.
        blocks: the Fisher blocks (their ``params`` are the model's parameters, carrying ``_hp_mapping``).

    Attributes:
        write_back: ``write_back(i)`` copies group i's fp32 partition into DeepSpeed's low-precision partition; needed
            when DeepSpeed steps the groups one at a time (set by :func:`glue_zero_partitions`).

    Raises:
        ValueError: a group that does not hold exactly one flat partition, or a parameter of a block without
            DeepSpeed's fragment map.
    """

    partitioned = True

    def __init__(self, optimizer: torch.optim.Optimizer, blocks: Sequence[FisherBlock]) -> None:
        sizes = [len(g["params"]) for g in optimizer.param_groups]
        if not sizes or any(n != 1 for n in sizes):
            raise ValueError("SP-NGD under ZeRO stage 1/2 expects DeepSpeed's layout, one flat fp32 partition per "
                             f"parameter group; got {sizes} parameter(s) per group")
        for b in blocks:
            for p in b.params:
                if not hasattr(p, "_hp_mapping"):
                    raise ValueError(f"{b.name}: parameter without DeepSpeed's ZeRO fragment map (_hp_mapping)")
        self.opt = optimizer
        self.blocks = blocks
        self._flats = [g["params"][0] for g in optimizer.param_groups]
        self._kept: list[tuple[dict[str, Any], Tensor | None]] = []  # this step's earlier groups and their gradients
        self._deferred = False
        self.write_back: Callable[[int], None] | None = None
        self._index_cache: tuple[tuple[tuple[int, ...], torch.device], Tensor] | None = None
        self._layout: tuple[Any, FlatLayout | None] | None = None  # (group, where each block parameter lies)

    # ---- several groups: DeepSpeed's one-group-at-a-time calls ----------------------------------------------------
    def begin_step(self, groups: Groups) -> Groups | None:
        """Called at the start of every ``step()`` with the optimizer's current ``param_groups``: the groups the step
        updates now, or None when this call only keeps its group's gradient for the step on the last group's call.

        Raises:
            RuntimeError: DeepSpeed stepped the groups in another pattern than the one this relies on (one group per
                call, in order, every group once), or no :attr:`write_back` is installed; raised on every rank alike.
        """
        n = len(self._flats)
        if len(groups) == n:  # every group at once (one group only, BF16_Optimizer, a direct call)
            self._kept = []
            return groups
        which = [k for k, f in enumerate(self._flats) if len(groups) == 1 and groups[0]["params"][0] is f]
        if which and which[0] == 0:
            self._kept = []  # a new step (also after one that DeepSpeed abandoned between its calls)
        if not which or len(self._kept) != which[0] or self.write_back is None:
            seen, self._kept = len(self._kept), []
            why = ("no write_back is installed (build the engine with ds_spngd.initialize)" if which and
                   seen == which[0] else "expected one group per call, in order 0, 1, ..., every group once")
            raise RuntimeError(
                f"SP-NGD under ZeRO 1/2 with {n} parameter groups: step() was called with {len(groups)} group(s) "
                f"(group {which[0] if which else '?'}, after {seen} earlier group(s) of this step); {why}. "
                "ds_spngd.integrations.deepspeed.zero documents the calling pattern of DeepSpeed 0.19.8 this relies "
                "on.")
        k = which[0]
        if k < n - 1:
            grad = self._flats[k].grad
            self._kept.append((groups[0], None if grad is None else grad.detach().clone()))
            return None
        for (_, grad), flat in zip(self._kept, self._flats, strict=False):
            flat.grad = grad
        self._deferred = True
        return [g for g, _ in self._kept] + [groups[0]]

    def end_step(self, completed: bool) -> None:
        """After the step :meth:`begin_step` released: write the earlier groups' partitions back (when the step
        completed, applied or skipped) and drop the gradients kept for them, as DeepSpeed had."""
        if not self._deferred:
            return
        kept, self._kept, self._deferred = self._kept, [], False
        for k in range(len(kept)):
            self._flats[k].grad = None
        if completed:
            assert self.write_back is not None
            for k in range(len(kept)):
                self.write_back(k)

    # ---- gradients ------------------------------------------------------------------------------------------------
    def _flat(self, gi: int) -> Tensor:
        return self.opt.param_groups[gi]["params"][0]  # type: ignore[no-any-return]

    def _grads(self) -> list[Tensor] | None:
        """Every group's flat gradient partition, or None when one is missing (ZeRO sets all of them on every
        rank, so this is identical on all ranks)."""
        grads = [self._flat(gi).grad for gi in range(len(self.opt.param_groups))]
        return None if any(g is None for g in grads) else grads  # type: ignore[return-value]

    def _fragments(self, p: Tensor) -> tuple[int, int, int, int] | None:
        """(group, start in its flat partition, start in the flattened parameter, length) of p's piece here, or
        None."""
        m = getattr(p, "_hp_mapping", None)
        if m is None:
            return None
        return (int(m.param_group_index), int(m.hp_fragment_address.start), int(m.lp_fragment_address.start),
                int(m.hp_fragment_address.numel))

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
        if owners is None and ids and world_size(group) > 1:
            gathered = self._gathered(ids, grads, group)
            if gathered is not None:
                return gathered
        plan = [(None, list(ids))] if owners is None else [
            (o, [i for i in ids if owners[i] == o]) for o in range(world_size(group))]
        out: dict[int, list[Tensor]] = {}
        sent = 0
        me = rank(group)
        for dst, members in plan:
            if not members:
                continue
            params = [p for i in members for p in self.blocks[i].params]
            buf = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=grads[0].device)
            off = 0
            for p in params:
                frag = self._fragments(p)
                if frag is not None:
                    gi, hp, lp, n = frag
                    buf[off + lp : off + lp + n] = grads[gi][hp : hp + n].float()
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

    def _gathered(self, ids: Sequence[int], grads: list[Tensor], group: Any) -> tuple[BlockGrads, int] | None:
        """Every rank receives every block: the blocks' gradients as views of the all-gathered partitions
        (:mod:`ds_spngd.comm.fragments`: half an all-reduce's traffic), or None where that does not apply — the
        layout (learned once, a collective) leaves a parameter out, or the blocks asked for are under half the
        partitions (the all-reduce then moves less). Every condition is identical on every rank."""
        if self._layout is None or self._layout[0] is not group:
            keys = {(i, k): p for i, b in enumerate(self.blocks) for k, p in enumerate(b.params)}
            mine = {key: f for key, p in keys.items() if (f := self._fragments(p)) is not None}
            sizes = [self._flat(gi).numel() for gi in range(len(self.opt.param_groups))]
            self._layout = (group, exchange_layout(sizes, mine, {k: p.numel() for k, p in keys.items()}, group))
        layout = self._layout[1]
        params = [((i, k), p) for i in ids for k, p in enumerate(self.blocks[i].params)]
        if layout is None or any(key not in layout.offsets for key, _ in params) or \
                2 * sum(p.numel() for _, p in params) < world_size(group) * sum(layout.sizes):
            return None
        full = gather_flats([g.float() for g in grads], group)
        views = {key: full[layout.offsets[key][0]].narrow(0, layout.offsets[key][1], p.numel()).view_as(p)
                 for key, p in params}
        return {i: [views[(i, k)] for k in range(len(self.blocks[i].params))] for i in ids}, \
            sum(f.numel() for f in full) * 4

    def available(self, ids: Sequence[int]) -> list[int]:
        """All of ``ids`` when every group's partition has a gradient this step (ZeRO sets them on every rank), else
        none."""
        return list(ids) if self._grads() is not None else []

    def directions(self, nat: dict[int, list[Tensor]]) -> dict[Position, Tensor]:
        """Per group whose partition holds a block fragment: its gradient with every block fragment replaced by
        F̂⁻¹g's slice (the other groups keep their gradient)."""
        grads = self._grads()
        if grads is None:
            return {}
        out: dict[Position, Tensor] = {}
        for i, vs in nat.items():
            for p, v in zip(self.blocks[i].params, vs, strict=True):
                frag = self._fragments(p)
                if frag is not None:
                    gi, hp, lp, n = frag
                    if (gi, 0) not in out:
                        out[(gi, 0)] = grads[gi].float().clone()
                    out[(gi, 0)][hp : hp + n] = v.reshape(-1)[lp : lp + n]
        return out

    def final_mask(self, ids: Sequence[int]) -> dict[Position, Tensor | None]:
        """Per group whose partition holds a fragment of blocks ``ids``: a bool mask of those fragments' elements."""
        grads = self._grads()
        if grads is None:
            return {}
        out: dict[Position, Tensor | None] = {}
        for i in ids:
            for p in self.blocks[i].params:
                frag = self._fragments(p)
                if frag is not None:
                    gi, hp, _, n = frag
                    mask = out.get((gi, 0))
                    if mask is None:
                        mask = out[(gi, 0)] = torch.zeros(grads[gi].shape, dtype=torch.bool, device=grads[gi].device)
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
        grads = [g for g in (self._flat(gi).grad for gi in range(len(self.opt.param_groups))) if g is not None]
        if not grads:
            return flags
        frags: list[Tensor] = []
        owner: list[int] = []
        for i, b in enumerate(self.blocks):
            for p in b.params:
                frag = self._fragments(p)
                grad = self._flat(frag[0]).grad if frag is not None else None
                if frag is not None and grad is not None:
                    frags.append(grad[frag[1] : frag[1] + frag[3]])
                    owner.append(i)
        norms = max_abs([*frags, *grads])
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
        p = self.blocks[block_index].params[0]
        frag = self._fragments(p)
        if frag is None:
            return []
        gi, hp, _, n = frag
        return [self._flat(gi).data[hp : hp + n]]

    def reduce_squares(self, squares: Tensor, group: Any) -> Tensor:
        """Sum the per-block squared norms of the fragments over the ranks (one small all-reduce)."""
        return all_reduce_sum(squares, group)  # type: ignore[no-any-return]

    def momentum_numel(self) -> int:
        """Elements of the momentum buffers this rank keeps: the partitions of the groups with momentum ≠ 0."""
        return sum(int(g["params"][0].numel()) for g in self.opt.param_groups if float(g["momentum"]) != 0.0)


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
    """ZeRO 1/2 (DeepSpeedZeroOptimizer) glue: install ``grads.write_back`` (DeepSpeed's own fp32 → low-precision
    copy after group i's step, stage_1_and_2.py l. 3143–3145, which SP-NGD's deferred step must redo for the earlier
    groups) and return the :class:`StateLinks` of the optimizer-state fragments.

    Returns:
        None when ``grads`` is None (stage 0) or the wrapper is not DeepSpeedZeroOptimizer (BF16_Optimizer steps
        every group in one call and links after it).
    """
    if grads is None or not all(hasattr(wrapper, a) for a in _ZERO_ATTRIBUTES):
        return None

    def write_back(i: int) -> None:
        part = rank(wrapper.real_dp_process_group[i])
        wrapper.parallel_partitioned_bit16_groups[i][part].data.copy_(wrapper.single_partition_of_fp32_groups[i].data)

    grads.write_back = write_back
    return StateLinks(wrapper, optimizer)
