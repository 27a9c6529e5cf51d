"""Small BatchNorm CNN for MNIST whose K-FAC factors stay small (every layer input dimension <= 576)."""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    """3x3 convolution (padding 1, no bias: BN has one) + BatchNorm2d + ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class SmallCNN(nn.Module):
    """conv 1->32 (s1) / 32->64 (s2) / 64->128 (s2), each 3x3 + BN + ReLU, global average pool, Linear 128->classes.

    K-FAC input dimensions (``C_in * 3 * 3`` for convolutions): 9, 288, 576; the classifier's is 128.
    For 28x28 inputs the feature maps are 28x28, 14x14 and 7x7.

    Args:
        num_classes: number of output logits.
        in_channels: input image channels (1 for MNIST).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        if num_classes <= 0 or in_channels <= 0:
            raise ValueError(f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}")
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, 32, stride=1),
            _conv_bn_relu(32, 64, stride=2),
            _conv_bn_relu(64, 128, stride=2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(N, in_channels, H, W)`` (any H, W >= 1) to logits ``(N, num_classes)``."""
        return self.classifier(self.features(x))
