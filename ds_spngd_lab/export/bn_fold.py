"""BatchNorm folding into the preceding Conv1d/2d/3d or Linear layer (Krishnamoorthi 2018, arXiv:1806.08342; Jacob
et al. 2018, arXiv:1712.05877), exact in real arithmetic: the BN's eval-mode map ``y = s ⊙ z + t``
(:func:`ds_spngd_lab.export.quantized_bn.bn_scale_shift`) is moved into the layer, ``W' = diag(s) W``,
``b' = s ⊙ b + t``. The fixed-point alternative for BN layers that cannot be folded is
:mod:`ds_spngd_lab.export.quantized_bn`.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import TypeVar

import torch
import torch.fx
from torch import nn

from ds_spngd_lab.export.quantized_bn import bn_scale_shift, check_all_bns, replace_module

__all__ = ["fold_bn_into_conv"]

_ModuleT = TypeVar("_ModuleT", bound=nn.Module)
#: layer type -> BN types it folds with (the BN must normalise the layer's output channels, dim 1)
_FOLDS: tuple[tuple[type[nn.Module], tuple[type[nn.Module], ...]], ...] = (
    (nn.Conv1d, (nn.BatchNorm1d, nn.SyncBatchNorm)),
    (nn.Conv2d, (nn.BatchNorm2d, nn.SyncBatchNorm)),
    (nn.Conv3d, (nn.BatchNorm3d, nn.SyncBatchNorm)),
    (nn.Linear, (nn.BatchNorm1d, nn.SyncBatchNorm)),
)


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    """Whether ``bn`` normalises the output channels of ``layer`` (see :data:`_FOLDS`)."""
    for layer_type, bn_types in _FOLDS:
        if isinstance(layer, layer_type) and isinstance(bn, bn_types):
            out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            return out == bn.num_features
    return False


def _pairs_from_graph(model: nn.Module) -> list[tuple[str, str]] | None:
    """``(layer name, BN name)`` where the traced graph feeds the layer's output only into the BN, each module called
    once; ``None`` if ``torch.fx`` cannot trace the model."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # data-dependent control flow and the like: fall back to nn.Sequential order
        return None
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        prev = node.args[0]
        if not isinstance(prev, torch.fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        bn_name, layer_name = str(node.target), str(prev.target)
        if calls[bn_name] == 1 and calls[layer_name] == 1:
            if _foldable(model.get_submodule(layer_name), model.get_submodule(bn_name)):
                pairs.append((layer_name, bn_name))
    return pairs


def _pairs_from_sequentials(model: nn.Module) -> list[tuple[str, str]]:
    """``(layer name, BN name)`` for consecutive children of every ``nn.Sequential``."""
    pairs = []
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (a_name, a), (b_name, b) in zip(children, children[1:], strict=False):
            if _foldable(a, b):
                prefix = f"{seq_name}." if seq_name else ""
                pairs.append((prefix + a_name, prefix + b_name))
    return pairs


@torch.no_grad()
def fold_bn_into_conv(model: _ModuleT) -> _ModuleT:
    """A deep copy of ``model`` in which every BN directly after a Conv1d/2d/3d or Linear is folded into it.

    "Directly after": in the ``torch.fx`` trace the layer's output feeds only the BN (and both are called once), or,
    if the model cannot be traced, the two are consecutive children of an ``nn.Sequential``. The layer gets
    ``W' = diag(s) W``, ``b' = s ⊙ b + t`` (a bias is added if it had none), computed in float64 and rounded once to
    the parameter dtype; the BN becomes ``nn.Identity``. Other BN layers are left in place. Exact in real arithmetic.
    Linear -> BatchNorm1d assumes the usual ``(N, features)`` activations (the BN normalises the Linear's outputs).

    Raises:
        ValueError: a BatchNorm in training mode, without running statistics or with non-finite values.
    """
    check_all_bns(model)
    folded = copy.deepcopy(model)
    pairs = _pairs_from_graph(folded)
    if pairs is None:
        pairs = _pairs_from_sequentials(folded)
    for layer_name, bn_name in pairs:
        layer, bn = folded.get_submodule(layer_name), folded.get_submodule(bn_name)
        assert isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
        s, t = (v.to(layer.weight.device) for v in bn_scale_shift(bn, bn_name))
        weight, old_bias = layer.weight, layer.bias
        w = weight.double() * s.view((-1,) + (1,) * (weight.dim() - 1))
        b = t if old_bias is None else old_bias.double() * s + t
        weight.copy_(w.to(weight.dtype))
        if old_bias is None:
            layer.bias = nn.Parameter(b.to(weight.dtype), requires_grad=weight.requires_grad)
        else:
            old_bias.copy_(b.to(old_bias.dtype))
        replace_module(folded, bn_name, nn.Identity())
    return folded
