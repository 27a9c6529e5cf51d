"""The training loop shared by the reference scripts (train.py, train_lm.py), and the set-up around it.

Set-up: :func:`read_ds_config` (the DeepSpeed JSON, resolved by the script and passed to DeepSpeed as a dict),
:func:`build_engine` (``ds_spngd.initialize``: SP-NGD or any DeepSpeed optimizer the JSON selects),
:func:`engine_dtype`, :func:`optimizer_type`.

Loop (:class:`TrainingLoop`): each optimizer step runs ``gradient_accumulation_steps`` micro-batches of
``forward -> engine.backward -> engine.step`` (the forward pass and the loss come from the script), agrees on the
step's mean loss across ranks before the boundary step (:func:`agreed_step_loss`), times the step, appends it to
``steps.csv`` (:class:`ds_spngd_lab.results.StepLog`, rank 0), sends it to DeepSpeed's monitor and a tqdm bar, and
evaluates every ``eval_interval`` steps and at the end (the script's evaluation; its time is excluded from the
training wall time), noting the first evaluation that reaches the target (and stopping there when asked). With an
:class:`ds_spngd_lab.adversarial.AdversarialStep` each micro-batch's loss is its clean + adversarial loss instead of
the script's (plain or ConAdv, the config's ``"adversarial"`` section).

End: :func:`report_run` writes ``result.json``, prints the result table and finishes the W&B run (rank 0).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm

import ds_spngd
from ds_spngd_lab.adversarial import AdversarialStep
from ds_spngd_lab.results import StepLog, write_json
from ds_spngd_lab.wandb_run import finish_wandb

Batch = tuple[torch.Tensor, torch.Tensor]


# ---- set-up ------------------------------------------------------------------------------------------------------
def read_ds_config(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """(path, parsed JSON) of ``args.deepspeed_config``; clears it on ``args``, because the scripts pass the resolved
    dict to DeepSpeed, which refuses a path and a dict together.

    Raises:
        OSError, json.JSONDecodeError: the file cannot be read or is not JSON.
    """
    path = Path(args.deepspeed_config)
    raw = json.loads(path.read_text(encoding="utf-8"))
    args.deepspeed_config = None
    return path, raw


def build_engine(args: argparse.Namespace, model: torch.nn.Module, model_parameters: Any,
                 config: dict[str, Any]) -> tuple[Any, bool]:
    """The DeepSpeed engine of ``model`` for the resolved ``config`` (``ds_spngd.initialize``), and whether the loop
    leaves a non-finite step to the optimizer (SP-NGD with ``"nonfinite": "skip"`` skips it on every rank)."""
    engine, _, _, _ = ds_spngd.initialize(args=args, model=model, model_parameters=model_parameters, config=config)
    spngd = ds_spngd.get_spngd(engine)
    return engine, spngd is not None and spngd.cfg.nonfinite == "skip"


def engine_dtype(engine: Any) -> torch.dtype:
    """The dtype the engine's model runs in: bf16 or fp16 when the config enables it, else fp32."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    return torch.float16 if engine.fp16_enabled() else torch.float32


def optimizer_type(config: dict[str, Any]) -> str:
    """The JSON's ``optimizer.type`` (``"client"`` when the script passes its own optimizer)."""
    return str(config.get("optimizer", {}).get("type", "client"))


def agreed_step_loss(loss_sum: torch.Tensor, micro_batches: int, world: int, step: int, raise_nonfinite: bool,
                     where: str = "") -> float:
    """The optimizer step's mean training loss over every rank's micro-batches, agreed before the boundary step.

    Called after the last micro-batch's backward, before ``engine.step()``: the one all-reduce is reached by every
    rank, so a non-finite loss on any rank stops all of them at the same point.

    Args:
        loss_sum: this rank's sum of micro-batch losses (a 1-element fp64 CPU tensor; summed over ranks in place).
        micro_batches: gradient_accumulation_steps.
        world: data-parallel world size.
        step: optimizer steps done so far (the message names step + 1).
        raise_nonfinite: raise on a non-finite loss (False when SP-NGD skips such steps itself, ``nonfinite: "skip"``).
        where: extra context for the message, e.g. ``" (epoch 3)"``.

    Raises:
        FloatingPointError: the mean loss is NaN/Inf and ``raise_nonfinite`` (on every rank).
    """
    if world > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
    value = float(loss_sum) / (micro_batches * world)
    if raise_nonfinite and not math.isfinite(value):
        raise FloatingPointError(
            f"non-finite training loss {value} at optimizer step {step + 1}{where}; stopped before applying the "
            'update (SP-NGD with "nonfinite": "skip" skips such steps)')
    return value


# ---- the loop ----------------------------------------------------------------------------------------------------
class EpochSource(Protocol):
    """Training batches: ``epoch(e)`` yields this rank's ``(inputs, targets)`` micro-batches of epoch ``e``."""

    def epoch(self, epoch: int) -> Iterator[Batch]: ...


@dataclass(frozen=True)
class Metric:
    """The evaluated quantity: tqdm postfix key ``name``, DeepSpeed monitor event ``event``, its direction, and the
    digits of the tqdm postfix (loss and metric)."""

    name: str
    event: str
    higher_is_better: bool
    digits: int

    def reaches(self, value: float, target: float) -> bool:
        """``value`` is at the ``target`` or better."""
        return value >= target if self.higher_is_better else value <= target


TOP1 = Metric("top1", "Test/top1", higher_is_better=True, digits=4)  # train.py: test top-1 in [0, 1]
VAL_LOSS = Metric("val", "Val/loss", higher_is_better=False, digits=3)  # train_lm.py: validation nats/token


@dataclass(frozen=True)
class LoopPlan:
    """How long and how the loop runs.

    Attributes:
        total_steps: optimizer steps to run. steps_per_epoch: a new epoch's batches every that many steps.
        global_batch: samples per optimizer step (``steps.csv``'s samples column). micro_batches:
        gradient_accumulation_steps. eval_interval: evaluate every that many steps (and after the last).
        desc: the tqdm bar's label. target: stop-or-report threshold of the metric (None: none). stop_at_target:
        stop at the first evaluation that reaches it. eval_at_start: also evaluate before the first step (recorded
        as step 0). monitor_lr: send ``Train/lr`` and ``Train/step`` with ``Train/loss`` to the monitor.
        epoch_in_errors: name the epoch in the non-finite loss error.
    """

    total_steps: int
    steps_per_epoch: int
    global_batch: int
    micro_batches: int
    eval_interval: int
    desc: str
    target: float | None = None
    stop_at_target: bool = False
    eval_at_start: bool = False
    monitor_lr: bool = True
    epoch_in_errors: bool = True


@dataclass
class LoopOutcome:
    """What the loop did: optimizer ``steps``, training wall time ``train_time_s`` (evaluation excluded), the last
    step's agreed ``loss``, the last evaluated ``metric`` (NaN before any), every evaluation as ``(step, training wall
    time s, metric)``, the first evaluation that reached the target as ``reached = (step, training wall time s)``
    (None: none), and every step's wall time."""

    steps: int = 0
    train_time_s: float = 0.0
    loss: float = float("nan")
    metric: float = float("nan")
    evals: list[tuple[int, float, float]] = field(default_factory=list)
    reached: tuple[int, float] | None = None
    step_times: list[float] = field(default_factory=list)


class TrainingLoop:
    """One run's optimizer steps and evaluations over a DeepSpeed engine.

    Args:
        engine: the DeepSpeed engine (:func:`build_engine`).
        plan: steps, batch layout, evaluation schedule, target.
        metric: what ``evaluate`` returns (:data:`TOP1`, :data:`VAL_LOSS`).
        forward_loss: ``(inputs, targets) -> loss`` of one micro-batch (forward pass included).
        evaluate: the metric of the current model, on every rank (a collective).
        rank, world: this rank and the data-parallel world size.
        skips_nonfinite: the optimizer skips non-finite steps itself (else the loop raises before the update).
        on_target: called with the step at the first evaluation that reaches ``plan.target``.
        adversarial: train on clean + adversarial examples (its ``loss`` replaces ``forward_loss``; None: clean).
    """

    def __init__(self, engine: Any, plan: LoopPlan, metric: Metric, forward_loss: Callable[[torch.Tensor, torch.Tensor],
                 torch.Tensor], evaluate: Callable[[], float], *, rank: int, world: int, skips_nonfinite: bool,
                 on_target: Callable[[int], None] | None = None,
                 adversarial: AdversarialStep | None = None) -> None:  # fmt: skip
        self.engine, self.plan, self.metric = engine, plan, metric
        self.adversarial = adversarial
        self.forward_loss, self.evaluate, self.on_target = forward_loss, evaluate, on_target
        self.rank, self.world, self.skips_nonfinite = rank, world, skips_nonfinite
        monitor = getattr(engine, "monitor", None)
        self.monitor = monitor if monitor is not None and monitor.enabled else None

    def run(self, source: EpochSource, steps_csv: Path) -> LoopOutcome:
        """Run ``plan.total_steps`` optimizer steps (fewer when stopped at the target) on ``source``'s batches,
        logging every step to ``steps_csv`` on rank 0.

        Raises:
            FloatingPointError: a step's mean loss is non-finite and the optimizer does not skip such steps.
        """
        plan, out, digits = self.plan, LoopOutcome(), self.metric.digits
        log = StepLog(steps_csv, enabled=self.rank == 0)
        bar = tqdm(total=plan.total_steps, disable=self.rank != 0, desc=plan.desc, unit="step", mininterval=1.0)
        try:
            if plan.eval_at_start:
                out.metric = self.evaluate()
                out.evals.append((0, 0.0, out.metric))
            batches = self._epoch(source, 0)
            while out.steps < plan.total_steps:
                step = out.steps
                if step % plan.steps_per_epoch == 0 and step > 0:
                    batches = self._epoch(source, step // plan.steps_per_epoch)
                t0 = time.perf_counter()
                lr = float(self.engine.get_lr()[0])
                out.loss = self._optimizer_step(batches, step)
                out.steps = step = step + 1
                out.step_times.append(time.perf_counter() - t0)
                out.train_time_s += out.step_times[-1]
                log.write(step, step * plan.global_batch, out.loss, lr, out.train_time_s)
                self._monitor_step(step, out.loss, lr)
                bar.update(1)
                bar.set_postfix(refresh=False, **{"loss": f"{out.loss:.{digits}f}",
                                                  self.metric.name: f"{out.metric:.{digits}f}"})  # fmt: skip
                if (step % plan.eval_interval == 0 or step == plan.total_steps) and self._evaluate(step, out):
                    break
        finally:
            bar.close()
            log.close()
        return out

    def _epoch(self, source: EpochSource, epoch: int) -> Iterator[Batch]:
        """Epoch ``epoch``'s micro-batches (through the adversarial look-ahead when there is one)."""
        batches = source.epoch(epoch)
        return batches if self.adversarial is None else self.adversarial.lookahead(batches, self.plan.micro_batches)

    def _optimizer_step(self, batches: Iterator[Batch], step: int) -> float:
        """One optimizer step's micro-batches; returns the step's mean loss agreed across ranks."""
        plan = self.plan
        loss_sum = torch.zeros(1, dtype=torch.float64)
        value = float("nan")
        for micro_idx in range(plan.micro_batches):
            x, y = next(batches)
            loss = self.forward_loss(x, y) if self.adversarial is None else self.adversarial.loss(x, y)
            self.engine.backward(loss)
            loss_sum += loss.detach().double().cpu()
            if micro_idx == plan.micro_batches - 1:  # before the boundary step: agree on finiteness across ranks
                where = f" (epoch {step // plan.steps_per_epoch})" if plan.epoch_in_errors else ""
                value = agreed_step_loss(loss_sum, plan.micro_batches, self.world, step, not self.skips_nonfinite,
                                         where=where)  # fmt: skip
                if self.adversarial is not None:
                    self.adversarial.before_update()  # ConAdv keeps w_t before the update overwrites it
            self.engine.step()
        return value

    def _monitor_step(self, step: int, loss: float, lr: float) -> None:
        """Send the step's loss (and LR and step count, ``plan.monitor_lr``) to DeepSpeed's monitor."""
        if self.monitor is None:
            return
        samples = self.engine.global_samples
        events: list[tuple[str, float, int]] = [("Train/loss", loss, samples)]
        if self.plan.monitor_lr:
            events += [("Train/lr", lr, samples), ("Train/step", step, samples)]
        self.monitor.write_events(events)

    def _evaluate(self, step: int, out: LoopOutcome) -> bool:
        """Evaluate after ``step``, record it, note the first time it reaches the target; True: stop here."""
        out.metric = self.evaluate()
        out.evals.append((step, out.train_time_s, out.metric))
        if self.monitor is not None:
            self.monitor.write_events([(self.metric.event, out.metric, self.engine.global_samples)])
        target = self.plan.target
        if target is not None and out.reached is None and self.metric.reaches(out.metric, target):
            out.reached = (step, out.train_time_s)
            if self.on_target is not None:
                self.on_target(step)
            return self.plan.stop_at_target
        return False


# ---- the end -----------------------------------------------------------------------------------------------------
def report_run(rank: int, result_json: Path, payload: dict[str, Any], table: Callable[[], str],
               wandb_summary: dict[str, Any] | None = None) -> None:
    """On rank 0: write ``payload`` to ``result_json``, print ``table()`` and, given ``wandb_summary``, finish the W&B
    run DeepSpeed's monitor opened with it as the summary (:func:`ds_spngd_lab.wandb_run.finish_wandb`)."""
    if rank != 0:
        return
    write_json(result_json, payload)
    print(table(), flush=True)
    if wandb_summary is not None:
        finish_wandb(wandb_summary)
