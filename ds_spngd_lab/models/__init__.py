"""Model zoo for the reference training script: ``build_model(name, num_classes, in_channels)``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ds_spngd_lab.models.cnn import CNN4_BLOCKS, SmallCNN
from ds_spngd_lab.models.mlp import MLP
from ds_spngd_lab.models.resnet import ResNet, resnet18, resnet50

__all__ = ["MLP", "MODEL_NAMES", "ResNet", "SmallCNN", "build_model", "resnet18", "resnet50"]


def _mlp(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return MLP(in_features=in_channels * image_size * image_size, num_classes=num_classes)


def _cnn(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return SmallCNN(num_classes=num_classes, in_channels=in_channels)


def _cnn4(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, blocks=CNN4_BLOCKS)


def _resnet18(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return resnet18(num_classes=num_classes, in_channels=in_channels)


def _resnet50(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return resnet50(num_classes=num_classes, in_channels=in_channels)


_BUILDERS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "cnn4": _cnn4,
    "resnet18": _resnet18,
    "resnet50": _resnet50,
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, num_classes: int, in_channels: int, image_size: int = 28) -> nn.Module:
    """Build a model that maps ``(N, in_channels, image_size, image_size)`` images to ``(N, num_classes)`` logits.

    Args:
        name: one of ``mlp``, ``cnn``, ``cnn4``, ``resnet18``, ``resnet50`` (case-insensitive).
        num_classes: number of output classes (> 0).
        in_channels: image channels (> 0).
        image_size: square input side in pixels; only the MLP's input width depends on it.

    Raises:
        ValueError: for an unknown name (listing the valid ones) or a non-positive size.
    """
    key = name.lower()
    if key not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    if num_classes <= 0 or in_channels <= 0 or image_size <= 0:
        raise ValueError(
            f"num_classes, in_channels and image_size must be positive, got {num_classes}, {in_channels}, {image_size}"
        )
    return _BUILDERS[key](num_classes, in_channels, image_size)
