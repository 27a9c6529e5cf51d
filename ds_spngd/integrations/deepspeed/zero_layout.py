"""Where this rank's piece of each model parameter lies in DeepSpeed's flat fp32 partitions, at ZeRO 1/2 and 3.

:class:`ZeroLayout` is what :class:`ds_spngd.integrations.deepspeed.zero.PartitionedGradients` reads: per parameter
group the flat fp32 partitions this rank steps (a *position* (group, index) names one), per model parameter its
fragment here and its full shape. Two builders:

* :func:`stage12_layout` — ZeRO 1/2 (``DeepSpeedZeroOptimizer``, ``BF16_Optimizer``): each group is one flat buffer
  cut into equal partitions, one per rank; each parameter carries DeepSpeed's fragment map ``_hp_mapping``
  (``param_group_index``, ``hp_fragment_address`` / ``lp_fragment_address``: start, numel). A parameter is one
  contiguous range of its group's flat, so its fragments on the ranks are consecutive.
* :func:`stage3_layout` — ZeRO 3 (``DeepSpeedZeroOptimizer_Stage3``): *each parameter* is cut into equal pieces of
  ``p.ds_tensor.ds_numel`` elements; rank r holds elements [r·n, min((r+1)·n, p.ds_numel)) of the flattened parameter
  (``partition_parameters.py`` 0.19.8 l. 785–793); the wrapper's ``grad_position[param_id] = [sub-group, offset,
  partition numel]`` (``stage3.py`` l. 1948–1956) says where that piece lies in the sub-group's flat
  (``fp32_partitioned_groups_flat[s]``), and ``sub_group_to_group_id[s]`` which parameter group holds sub-group s.
  Outside forward / backward the parameters are empty (``p.numel() == 0``): the full shape is ``p.ds_shape``.

Every DeepSpeed attribute read here is an entry of :data:`ds_spngd.integrations.deepspeed.patches.PATCHES`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ds_spngd.comm.collectives import rank
from ds_spngd.gradients import Position

__all__ = ["Fragment", "ZeroLayout", "is_zero3", "stage12_layout", "stage3_layout"]

Fragment = tuple[Position, int, int, int]
"""(position of the flat, start in that flat, start in the flattened parameter, length)."""


@dataclass
class ZeroLayout:
    """This rank's flat fp32 partitions and the model parameters' fragments in them.

    Attributes:
        flats: per parameter group, the flat fp32 partitions this rank steps (ZeRO 1/2: one; ZeRO 3: one per
            sub-group of the group), position (group, index).
        order: the flats in the order DeepSpeed steps them (ZeRO 3's sub-group order).
        fragments: ``id(parameter)`` → its fragment here (absent: no piece of it on this rank).
        shapes: ``id(parameter)`` → its full shape.
        stage: 1/2 (one flat per group) or 3.
        pieces: ZeRO 3: ``id(parameter)`` → (position, offset, piece length): where *every* rank keeps its piece
            (the partitions have equal lengths and offsets on all ranks; the last pieces are zero-padded).
    """

    flats: list[list[Tensor]]
    order: list[Position]
    fragments: dict[int, Fragment] = field(default_factory=dict)
    shapes: dict[int, torch.Size] = field(default_factory=dict)
    stage: int = 2
    pieces: dict[int, tuple[Position, int, int]] = field(default_factory=dict)

    def fragment(self, p: Tensor) -> Fragment | None:
        """``p``'s fragment on this rank, or None."""
        return self.fragments.get(id(p))

    def shape(self, p: Tensor) -> torch.Size:
        """``p``'s full shape (ZeRO 3 empties partitioned parameters between forward passes)."""
        return self.shapes.get(id(p), p.shape)

    def numel(self, p: Tensor) -> int:
        """``p``'s full number of elements."""
        return int(self.shape(p).numel())

    def flat(self, pos: Position) -> Tensor:
        """The flat fp32 partition at ``pos``."""
        return self.flats[pos[0]][pos[1]]

    @property
    def positions(self) -> list[Position]:
        """Every position, group by group."""
        return [(gi, j) for gi, fl in enumerate(self.flats) for j in range(len(fl))]


def is_zero3(params: Sequence[Tensor]) -> bool:
    """True when these model parameters are ZeRO-3 partitioned (they carry ``ds_id`` / ``ds_tensor``)."""
    return any(hasattr(p, "ds_tensor") for p in params)


def stage12_layout(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> ZeroLayout:
    """ZeRO 1/2: every parameter group holds one parameter, this rank's flat fp32 partition of the group.

    Raises:
        ValueError: a group that does not hold exactly one flat partition, or a parameter without ``_hp_mapping``.
    """
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if not sizes or any(n != 1 for n in sizes):
        raise ValueError("SP-NGD under ZeRO stage 1/2 expects DeepSpeed's layout, one flat fp32 partition per "
                         f"parameter group; got {sizes} parameter(s) per group")
    layout = ZeroLayout([[g["params"][0]] for g in optimizer.param_groups], [(gi, 0) for gi in range(len(sizes))])
    for p in params:
        if not hasattr(p, "_hp_mapping"):
            raise ValueError(f"parameter of shape {tuple(p.shape)} without DeepSpeed's ZeRO fragment map (_hp_mapping)")
        layout.shapes[id(p)] = p.shape
        m = getattr(p, "_hp_mapping")  # noqa: B009 - None: no piece of p in this rank's partition
        if m is not None:
            layout.fragments[id(p)] = ((int(m.param_group_index), 0), int(m.hp_fragment_address.start),
                                       int(m.lp_fragment_address.start), int(m.hp_fragment_address.numel))
    return layout


def stage3_layout(wrapper: Any, params: Sequence[Tensor]) -> ZeroLayout:
    """ZeRO 3: the sub-groups' flat fp32 partitions per parameter group and each parameter's piece (module
    docstring).

    Raises:
        ValueError: a parameter the wrapper does not partition (no ``grad_position``).
    """
    group_of = [int(wrapper.sub_group_to_group_id[s]) for s in range(len(wrapper.fp32_partitioned_groups_flat))]
    n_groups = max(group_of, default=-1) + 1
    flats: list[list[Tensor]] = [[] for _ in range(n_groups)]
    order: list[Position] = []
    for s, gi in enumerate(group_of):
        order.append((gi, len(flats[gi])))
        flats[gi].append(wrapper.fp32_partitioned_groups_flat[s])
    layout = ZeroLayout(flats, order, stage=3)
    for p in params:
        zp: Any = p  # a ZeRO-3 parameter: ds_tensor, ds_shape, ds_numel, ds_process_group
        me = rank(getattr(zp, "ds_process_group", None) or wrapper.dp_process_group)
        pid = wrapper.get_param_id(p)
        if pid not in wrapper.grad_position:
            raise ValueError(f"parameter {getattr(zp, 'ds_id', '?')} of shape {tuple(zp.ds_shape)} is not in the "
                             "ZeRO-3 optimizer's partitions")
        s, offset, _ = (int(v) for v in wrapper.grad_position[pid])
        piece = int(zp.ds_tensor.ds_numel)
        layout.shapes[id(p)] = torch.Size(zp.ds_shape)
        layout.pieces[id(p)] = (order[s], offset, piece)
        n = max(0, min(piece, int(zp.ds_numel) - me * piece))
        if n > 0:
            layout.fragments[id(p)] = (order[s], offset, me * piece, n)
    return layout
