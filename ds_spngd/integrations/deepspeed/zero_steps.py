"""How DeepSpeed's ZeRO wrappers call the client optimizer's ``step()``, and how SP-NGD turns their several calls into
one step: :class:`GroupByGroup` (ZeRO 1/2) and :class:`FlatByFlat` (ZeRO 3).

Both wrappers step one flat fp32 partition per call and free its gradient right after, so no single call sees every
Fisher block. SP-NGD **defers to the last call**: each earlier call keeps a copy of its partition's gradient and
returns; the last call puts every partition and every kept gradient back and runs SP-NGD's whole step once (one
agreement, inversion, preconditioning of every block, KL-clipping over all blocks, every group's elementwise update);
afterwards the earlier partitions' updated fp32 values are copied into DeepSpeed's low-precision partitions
(``write_back``, what DeepSpeed did right after their no-op calls). Every rank makes the same calls in the same order,
so the collectives stay at fixed places. The kept gradients are copies (DeepSpeed frees its own after each call), so
the peak is the gradient partitions of all groups, as with one group.

* ZeRO 1/2 (``stage_1_and_2.py`` 0.19.8, ``DeepSpeedZeroOptimizer.step`` l. 3075–3145, ``_optimizer_step`` l.
  2967–2987): ``param_groups`` narrowed to ``[original_param_groups[i]]`` (group i holds one flat partition) for the
  call of group i, in order. DeepSpeed's ``BF16_Optimizer`` and stage 0 call once with every group.
* ZeRO 3 (``stage3.py`` 0.19.8, ``DeepSpeedZeroOptimizer_Stage3.step`` l. 2907–2927, ``_optimizer_step`` l.
  1235–1262): every parameter group is kept, its ``params`` list is ``[]`` except for the group of the current
  sub-group s, which holds ``[fp32_partitioned_groups_flat[s]]``; sub-groups in order; after the call the list is
  set back to ``[]``. (A large group is cut into several sub-groups, ``sub_group_size``.) During SP-NGD's step each
  group holds all of its sub-groups' flats, in sub-group order; afterwards the lists are put back as DeepSpeed left
  them.

Raises RuntimeError (the same on every rank: it depends on the call pattern only) when DeepSpeed calls in another
pattern.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from ds_spngd.gradients import Groups, Position

__all__ = ["FlatByFlat", "GroupByGroup"]

_DOC = "ds_spngd.integrations.deepspeed.zero_steps documents the calling pattern of DeepSpeed 0.19.8 this relies on."


def _copy(grad: Tensor | None) -> Tensor | None:
    return None if grad is None else grad.detach().clone()


class GroupByGroup:
    """ZeRO 1/2: one call per parameter group, ``param_groups`` narrowed to it (module docstring).

    Args:
        flats: per parameter group, its flat fp32 partition.

    Attributes:
        write_back: ``write_back(i)`` copies group i's fp32 partition into DeepSpeed's low-precision partition.
    """

    def __init__(self, flats: Sequence[Tensor]) -> None:
        self.flats = list(flats)
        self.write_back: Callable[[int], None] | None = None
        self._kept: list[tuple[dict[str, Any], Tensor | None]] = []
        self._deferred = False

    def begin(self, groups: Groups) -> Groups | None:
        """The groups the step updates now, or None when this call only keeps its group's gradient.

        Raises:
            RuntimeError: another calling pattern than one group per call, in order, every group once; or no
                :attr:`write_back` installed.
        """
        n = len(self.flats)
        if len(groups) == n:  # every group at once (one group only, BF16_Optimizer, a direct call)
            self._kept = []
            return groups
        which = [k for k, f in enumerate(self.flats) if len(groups) == 1 and groups[0]["params"][0] is f]
        if which and which[0] == 0:
            self._kept = []  # a new step (also after one that DeepSpeed abandoned between its calls)
        if not which or len(self._kept) != which[0] or self.write_back is None:
            seen, self._kept = len(self._kept), []
            why = ("no write_back is installed (build the engine with ds_spngd.initialize)" if which and
                   seen == which[0] else "expected one group per call, in order 0, 1, ..., every group once")
            raise RuntimeError(
                f"SP-NGD under ZeRO 1/2 with {n} parameter groups: step() was called with {len(groups)} group(s) "
                f"(group {which[0] if which else '?'}, after {seen} earlier group(s) of this step); {why}. {_DOC}")
        k = which[0]
        if k < n - 1:
            self._kept.append((groups[0], _copy(self.flats[k].grad)))
            return None
        for (_, grad), flat in zip(self._kept, self.flats, strict=False):
            flat.grad = grad
        self._deferred = True
        return [g for g, _ in self._kept] + [groups[0]]

    def end(self, completed: bool) -> None:
        """After the released step: write the earlier groups back (when it completed) and drop their gradients."""
        if not self._deferred:
            return
        kept, self._kept, self._deferred = self._kept, [], False
        for k in range(len(kept)):
            self.flats[k].grad = None
        if completed:
            assert self.write_back is not None
            for k in range(len(kept)):
                self.write_back(k)


class FlatByFlat:
    """ZeRO 3: one call per sub-group, every group present, only the current sub-group's flat in its group's list
    (module docstring).

    Args:
        flats: per parameter group, the flat fp32 partitions of its sub-groups (sub-group order).
        order: per sub-group (DeepSpeed's order), its position (group, index in ``flats[group]``).

    Attributes:
        write_back: ``write_back(s)`` copies sub-group s's fp32 partition into DeepSpeed's low-precision one.
    """

    def __init__(self, flats: Sequence[Sequence[Tensor]], order: Sequence[Position]) -> None:
        self.flats = [list(f) for f in flats]
        self.order = list(order)
        self.write_back: Callable[[int], None] | None = None
        self._kept: list[Tensor | None] = []
        self._restore: list[tuple[dict[str, Any], list[Tensor]]] | None = None

    def _which(self, groups: Groups) -> int:
        present = [g["params"] for g in groups if g["params"]]
        if len(present) != 1 or len(present[0]) != 1:
            return -1
        return next((s for s, (gi, j) in enumerate(self.order) if self.flats[gi][j] is present[0][0]), -1)

    def begin(self, groups: Groups) -> Groups | None:
        """The groups the step updates now (each holding all its sub-groups' flats), or None when this call only
        keeps its sub-group's gradient.

        Raises:
            RuntimeError: another calling pattern than one sub-group per call, in order, every one once; or no
                :attr:`write_back` installed while there are several sub-groups.
        """
        n, s = len(self.order), self._which(groups)
        if s == 0:
            self._kept = []
        if s < 0 or len(self._kept) != s or (n > 1 and self.write_back is None):
            seen, self._kept = len(self._kept), []
            why = ("no write_back is installed (build the engine with ds_spngd.initialize)" if s >= 0 and seen == s
                   else "expected one sub-group's flat partition per call, in order 0, 1, ..., every one once")
            raise RuntimeError(
                f"SP-NGD under ZeRO 3 with {n} sub-group(s): step() was called with "
                f"{[len(g['params']) for g in groups]} parameter(s) per group (sub-group {s if s >= 0 else '?'}, "
                f"after {seen} earlier one(s) of this step); {why}. {_DOC}")
        flat = self.flats[self.order[s][0]][self.order[s][1]]
        if s < n - 1:
            self._kept.append(_copy(flat.grad))
            return None
        for k, grad in enumerate(self._kept):
            gi, j = self.order[k]
            self.flats[gi][j].grad = grad
        self._restore = [(g, g["params"]) for g in groups]
        for g, fl in zip(groups, self.flats, strict=True):
            g["params"] = list(fl)
        return groups

    def end(self, completed: bool) -> None:
        """After the released step: the groups' lists as DeepSpeed left them, the earlier sub-groups written back
        (when it completed) and their gradients dropped."""
        if self._restore is None:
            return
        for g, params in self._restore:
            g["params"] = params
        kept, self._kept, self._restore = self._kept, [], None
        for k in range(len(kept)):
            gi, j = self.order[k]
            self.flats[gi][j].grad = None
        if completed:
            assert self.write_back is not None or not kept
            for k in range(len(kept)):
                self.write_back(k)  # type: ignore[misc]
