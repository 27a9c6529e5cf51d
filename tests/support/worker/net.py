"""The tiny net every case trains, its parameter groups, and the fixed global batch size."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tests.support.worker.case import Case

GLOBAL_BATCH = 24


class Net(nn.Module):
    """Conv → ReLU → Linear → LayerNorm → ReLU → Linear, optionally with an extra Linear(5, 5) on the logits.

    ``extra`` is :attr:`Case.extra`; ``twice`` the (rank, step) at which "twice" calls the extra layer a second time.
    The run loop sets :attr:`step` before each step.
    """

    def __init__(self, extra: str | None = None, rank: int = 0, twice: tuple[int, int] = (-1, -1)) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16),
                                  nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 5))
        self.extra = nn.Linear(5, 5) if extra else None
        self.mode, self.rank, self.twice, self.step = extra, rank, twice, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.extra is None or self.mode == "never":
            return out
        if self.mode == "rank0" and self.rank != 0:
            return out + 0.0 * self.extra.weight.sum() + 0.0 * self.extra.bias.sum()  # a gradient, no hook
        if self.mode == "rank0_nograd" and self.rank != 0:
            return out  # no gradient at all on the other ranks (None until someone fills it)
        out = out + self.extra(out)
        if self.mode == "twice" and (self.rank, self.step) == self.twice:
            out = out + self.extra(out)
        return out


def make_model(case: Case | None = None, rank: int = 0) -> nn.Module:
    """The seeded net of ``case`` on ``rank``: without ``extra`` the plain Sequential (parameter names "0.weight",
    ...), with it a :class:`Net`."""
    torch.manual_seed(0)
    extra = case.extra if case is not None else None
    inject = case.inject if case is not None else None
    twice = (inject.rank, inject.step) if inject is not None else (-1, -1)
    body = Net(extra, rank, twice)
    if extra is None:
        return body.body
    return body


def param_groups(model: nn.Module, groups: str) -> list[dict[str, Any]]:
    """:attr:`Case.groups`: "wd" — the transformers recipe: a decay group (Conv/Linear weights, weight_decay 0.1) and a
    no-decay group (their biases and the LayerNorm, weight_decay 0), so each block's weight and bias sit in different
    groups; "lr" — the same split with the no-decay group at its own lr 0.05 and momentum 0.5, the decay group at lr
    0.1 (no scheduler then: WarmupLR would set every group's lr alike)."""
    decay = [p for p in model.parameters() if len(getattr(p, "ds_shape", p.shape)) > 1]
    no_decay = [p for p in model.parameters() if len(getattr(p, "ds_shape", p.shape)) <= 1]
    if groups == "wd":
        return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return [{"params": decay, "weight_decay": 1e-3, "lr": 0.1},
            {"params": no_decay, "weight_decay": 0.0, "lr": 0.05, "momentum": 0.5}]
