"""Tests for ds_spngd_lab.loop: the shared training loop of train.py / train_lm.py, driven by a stand-in engine (one
rank, no DeepSpeed): step log, epochs, evaluation schedule, target, stop, monitor events, non-finite losses."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ds_spngd_lab.loop import TOP1, VAL_LOSS, LoopPlan, TrainingLoop, agreed_step_loss


class FakeMonitor:
    enabled = True

    def __init__(self) -> None:
        self.events: list[tuple[str, float, int]] = []

    def write_events(self, events: list[tuple[str, float, int]]) -> None:
        self.events += events


class FakeEngine:
    """Counts backward / step calls; the loss of a micro-batch is the mean of its inputs."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.backwards = 0
        self.steps = 0
        self.global_samples = 0
        self.monitor = FakeMonitor()

    def get_lr(self) -> list[float]:
        return [0.1 * (self.steps + 1)]

    def backward(self, loss: torch.Tensor) -> None:
        self.backwards += 1

    def step(self) -> None:
        self.steps += 1
        self.global_samples += 2


class Source:
    """Epoch e yields micro-batches whose inputs are all e (so the loss names the epoch)."""

    def __init__(self) -> None:
        self.epochs: list[int] = []

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.epochs.append(epoch)
        while True:
            yield torch.full((2,), float(epoch)), torch.zeros(2)


def _loop(engine: FakeEngine, metrics: list[float], **plan: Any) -> tuple[TrainingLoop, list[int]]:
    seen: list[int] = []
    values = iter(metrics)
    metric = plan.pop("metric", TOP1)
    base: dict[str, Any] = dict(total_steps=6, steps_per_epoch=4, global_batch=8, micro_batches=2, eval_interval=2,
                                desc="test")  # fmt: skip
    loop = TrainingLoop(engine, LoopPlan(**{**base, **plan}), metric,
                        lambda x, y: x.mean(), lambda: next(values), rank=0, world=1, skips_nonfinite=False,
                        on_target=seen.append)  # fmt: skip
    return loop, seen


def test_loop_logs_every_step_and_evaluates_on_schedule(tmp_path: Path) -> None:
    engine, source = FakeEngine(), Source()
    loop, seen = _loop(engine, [0.5, 0.9, 0.95], target=0.9)
    out = loop.run(source, tmp_path / "steps.csv")
    assert out.steps == 6 and engine.backwards == 12 and engine.steps == 12
    assert source.epochs == [0, 1]  # a new epoch's batches after steps_per_epoch steps
    assert out.loss == 1.0  # the last step's mean loss: epoch 1's inputs
    assert [e[0] for e in out.evals] == [2, 4, 6] and out.metric == 0.95
    assert out.reached is not None and out.reached[0] == 4 and seen == [4]  # first time only
    assert len(out.step_times) == 6 and out.train_time_s == pytest.approx(sum(out.step_times))
    rows = list(csv.reader((tmp_path / "steps.csv").open()))
    assert rows[0] == ["step", "samples", "loss", "lr", "wall_time_s"] and len(rows) == 7
    assert rows[1][:4] == ["1", "8", "0", "0.1"] and rows[6][:3] == ["6", "48", "1"]
    names = [e[0] for e in engine.monitor.events]
    assert names.count("Train/loss") == names.count("Train/lr") == names.count("Train/step") == 6
    assert names.count("Test/top1") == 3


def test_loop_stops_at_target_and_evaluates_at_start(tmp_path: Path) -> None:
    engine = FakeEngine()
    loop, _ = _loop(engine, [3.0, 2.0, 1.0], metric=VAL_LOSS, target=1.5, stop_at_target=True, eval_at_start=True,
                    monitor_lr=False, eval_interval=3, total_steps=9)  # fmt: skip
    out = loop.run(Source(), tmp_path / "steps.csv")
    assert out.evals == [(0, 0.0, 3.0), (3, out.evals[1][1], 2.0), (6, out.evals[2][1], 1.0)]
    assert out.steps == 6 and out.reached == (6, out.train_time_s)  # lower is better; stopped there
    names = [e[0] for e in engine.monitor.events]
    assert "Train/lr" not in names and names.count("Val/loss") == 2  # the start evaluation is not sent


def test_non_finite_loss_raises_before_the_update(tmp_path: Path) -> None:
    engine = FakeEngine()
    loop, _ = _loop(engine, [])
    loop.forward_loss = lambda x, y: x.mean() * float("nan")
    with pytest.raises(FloatingPointError, match=r"optimizer step 1 \(epoch 0\)"):
        loop.run(Source(), tmp_path / "steps.csv")
    assert engine.backwards == 2 and engine.steps == 1  # the boundary step was never taken
    assert (tmp_path / "steps.csv").read_text().splitlines() == ["step,samples,loss,lr,wall_time_s"]


def test_agreed_step_loss_single_rank() -> None:
    assert agreed_step_loss(torch.tensor([3.0], dtype=torch.float64), 2, 1, 0, True) == 1.5
    assert agreed_step_loss(torch.tensor([float("inf")], dtype=torch.float64), 2, 1, 0, False) == float("inf")
    with pytest.raises(FloatingPointError, match="optimizer step 5;"):
        agreed_step_loss(torch.tensor([float("nan")], dtype=torch.float64), 1, 1, 4, True)
