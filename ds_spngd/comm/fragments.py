"""Whole tensors from their fragments in equal-size flat partitions, by one all-gather per flat.

ZeRO 1/2 (:mod:`ds_spngd.integrations.deepspeed.zero`) keeps each parameter group as one flat buffer cut into equal
partitions, one per rank, and every parameter is a contiguous range of its group's flat: its fragments on the ranks
are consecutive pieces of that range. Gathering every rank's partition in group-rank order puts each parameter's
whole gradient at one offset of the gathered flat, where it is read as a view. Compared with all-reducing a buffer of
zero-padded fragments (the general way, which works for any layout), the all-gather hands each rank (W−1)/W of the
flat on a ring instead of 2(W−1)/W, and it copies the values instead of adding zeros to them (bit for bit the same,
but for the sign of a −0.0, which x + 0 turns into +0.0).

The layout is learned once (:func:`exchange_layout`: every rank's fragment map in one ``all_gather_object``) and
applies only to the tensors whose fragments tile one contiguous range of one flat (:func:`layout_from`); callers keep
their all-reduce for anything else.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist
from torch import Tensor

from ds_spngd.comm.collectives import all_gather_flat, world_size

__all__ = ["Fragment", "FlatLayout", "exchange_layout", "gather_flats", "layout_from"]

Fragment = tuple[int, int, int, int]
"""(flat index, start in this rank's partition of that flat, start in the flattened tensor, length)."""

K = TypeVar("K", bound=Hashable)  # what names a tensor (e.g. (block index, parameter index))
RankFragments = tuple[Sequence[int], Mapping[Any, Fragment]]
"""What one rank reports: its partition length per flat, and its fragment of every tensor it holds a piece of."""


@dataclass(frozen=True)
class FlatLayout:
    """Where whole tensors lie in the gathered flats (identical on every rank).

    Attributes:
        sizes: per flat, the partition length (the same on every rank).
        offsets: tensor key → (flat index, start in the gathered flat), for the tensors that are one contiguous range.
    """

    sizes: tuple[int, ...]
    offsets: dict[Any, tuple[int, int]]


def layout_from(reports: Sequence[RankFragments], numels: Mapping[K, int]) -> FlatLayout | None:
    """The layout of every rank's report (group-rank order).

    Args:
        reports: per rank, (partition length per flat, key → fragment).
        numels: key → the tensor's number of elements.

    Returns:
        None when the partitions' lengths differ between ranks (no all-gather of equal pieces); else the layout,
        holding the keys whose fragments (over all ranks) lie in one flat at one consistent start and cover the
        tensor exactly once, in order.
    """
    sizes = tuple(int(s) for s in reports[0][0]) if reports else ()
    if any(tuple(int(s) for s in r[0]) != sizes for r in reports):
        return None
    pieces: dict[Any, list[tuple[int, int, int, int]]] = {}
    for r, (_, frags) in enumerate(reports):
        for key, (flat, start, first, n) in frags.items():
            pieces.setdefault(key, []).append((flat, r * sizes[flat] + start - first, first, n))
    offsets: dict[Any, tuple[int, int]] = {}
    for key, ps in pieces.items():
        ps.sort(key=lambda p: p[2])
        where = {(flat, origin) for flat, origin, _, _ in ps}
        ends = [0] + [first + n for _, _, first, n in ps]
        if len(where) == 1 and [first for _, _, first, _ in ps] == ends[:-1] and ends[-1] == numels.get(key):
            offsets[key] = next(iter(where))
    return FlatLayout(sizes, offsets)


def exchange_layout(sizes: Sequence[int], fragments: Mapping[K, Fragment], numels: Mapping[K, int],
                    group: Any) -> FlatLayout | None:
    """:func:`layout_from` of every rank's ``(sizes, fragments)``, exchanged with one ``all_gather_object`` over
    ``group`` (a collective: every rank calls it at the same point)."""
    reports: list[Any] = [None] * world_size(group)
    mine = (list(sizes), dict(fragments))
    if len(reports) == 1:
        reports = [mine]
    else:
        dist.all_gather_object(reports, mine, group=group)
    return layout_from(reports, numels)


def gather_flats(parts: Sequence[Tensor], group: Any) -> list[Tensor]:
    """Per flat, every rank's partition concatenated in group-rank order (one all-gather each; every rank's
    ``parts[i]`` has the same length)."""
    w = world_size(group)
    return [all_gather_flat(p.new_empty(w * p.numel()), p.contiguous(), group) for p in parts]
