"""Multi-layer perceptron for flattened images (MNIST by default)."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """``in_features -> hidden -> hidden -> num_classes`` with ReLU between the linear layers.

    Args:
        in_features: flattened input size (784 for 1x28x28 MNIST).
        hidden: width of both hidden layers.
        num_classes: number of output logits.

    Raises:
        ValueError: if any size is not positive.
    """

    def __init__(self, in_features: int = 784, hidden: int = 512, num_classes: int = 10) -> None:
        super().__init__()
        if min(in_features, hidden, num_classes) <= 0:
            raise ValueError(f"sizes must be positive, got in={in_features} hidden={hidden} classes={num_classes}")
        self.in_features = in_features
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map inputs of shape ``(N, ...)`` with ``in_features`` elements per sample to logits ``(N, num_classes)``.

        Raises:
            ValueError: if a sample does not have ``in_features`` elements.
        """
        h = x.flatten(1)
        if h.shape[1] != self.in_features:
            raise ValueError(f"MLP expects {self.in_features} features per sample, got input {tuple(x.shape)}")
        return self.fc3(self.act(self.fc2(self.act(self.fc1(h)))))
