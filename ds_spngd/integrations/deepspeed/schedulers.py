"""``"scheduler": {"type": "AdaptiveWarmup", "params": {...}}`` in a DeepSpeed JSON, through ``ds_spngd.initialize``.

:class:`ds_spngd.schedules.AdaptiveWarmup` (AutoWU, Kim et al., arXiv:2107.05855) ends its warmup when the training
loss stops decreasing, so it must see the loss; DeepSpeed has no scheduler registry and never shows a scheduler the
loss. The glue (:func:`initialize_with_scheduler`, called by ``ds_spngd.initialize`` around everything else it does):

* takes the ``scheduler`` section out of the config when its type is ``AdaptiveWarmup`` (case-insensitive) and
  validates ``params`` first (:class:`ds_spngd.schedules.AdaptiveWarmupConfigError` names the key;
  ``total_num_steps`` must be an integer by then: the lab's ``resolve_config`` fills ``"auto"``);
* passes ``lr_scheduler=`` a callable to ``deepspeed.initialize``: DeepSpeed calls it with the optimizer it steps
  (``engine.basic_optimizer``: SP-NGD, a LARS / Lamb client optimizer, or DeepSpeed's own SGD / AdamW built from the
  JSON; under ZeRO its flat-partition groups) and steps the scheduler inside ``engine.step()``, after the optimizer
  step and not on steps it skipped (fp16 overflow) — DeepSpeed 0.19.8 ``runtime/engine.py`` ``_configure_lr_scheduler``
  and ``_take_model_step``;
* wraps ``engine.backward`` on the instance to add up this rank's micro-batch losses (detached), and ``engine.step``:
  at each gradient-accumulation boundary, before DeepSpeed's step (so before its ``lr_scheduler.step()``), one
  all-reduce of ``[loss sum, micro-batch count]`` over ``engine.data_parallel_group`` gives the step's mean loss over
  every rank's micro-batches, which is :meth:`~ds_spngd.schedules.AdaptiveWarmup.observe`\\ d. Every rank observes
  the same value and fits the same GP; in addition each test's outcome is broadcast from the group's first rank (the
  scheduler's ``agree`` hook, one 2-element broadcast every ``check_every`` steps), so all ranks end warmup on the
  same step with the same peak even if the fit's floating point differed between machines. A skipped step's
  observation is replaced by the next one (its scheduler step never came);
* logs ``AdaptiveWarmup/lr`` and ``AdaptiveWarmup/loss`` every step, and ``AdaptiveWarmup/warmup_steps`` and
  ``AdaptiveWarmup/peak_lr`` once warmup has ended, to ``engine.monitor.write_events`` when a monitor is enabled;
* DeepSpeed checkpoints save and restore the scheduler (``state_dict``: plain Python, the loss window and phase
  included).

Patches (instance attributes, like :mod:`.engine`): ``engine.backward`` and ``engine.step``. A loss not passed through
``engine.backward`` (e.g. a torch-style ``loss.backward()``) is not seen: the steps without one are not observed and a
warning says so once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ds_spngd.comm.collectives import all_reduce_sum, broadcast, world_size
from ds_spngd.integrations.deepspeed.ds_config import without_config_path
from ds_spngd.schedules import AdaptiveWarmup, AdaptiveWarmupConfig, parse_adaptive_warmup
from ds_spngd.schedules.warmup_config import AUTO, AdaptiveWarmupConfigError

__all__ = ["SCHEDULER_TYPE", "attach_adaptive_warmup", "initialize_with_scheduler", "is_adaptive_warmup_config",
           "take_adaptive_warmup"]

logger = logging.getLogger("ds_spngd")

SCHEDULER_TYPE = "AdaptiveWarmup"
SECTION_KEYS = frozenset({"type", "params"})
Initialize = Callable[[dict[str, Any]], tuple[Any, Any, Any, Any]]


@dataclass
class _LossSum:
    """This rank's micro-batch losses since the last accumulation boundary."""

    device: torch.device
    total: torch.Tensor = field(init=False)
    count: int = 0
    warned: bool = False  # the "no loss seen" warning was given

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total, self.count = torch.zeros((), dtype=torch.float64, device=self.device), 0

    def add(self, loss: torch.Tensor) -> None:
        self.total = self.total + loss.detach().to(device=self.device, dtype=torch.float64).sum()
        self.count += 1

    def agreed_mean(self, group: Any) -> float | None:
        """The mean over every rank's micro-batch losses (one all-reduce, every rank must call it); resets. None when
        no rank saw a loss."""
        packed = torch.stack([self.total, torch.tensor(float(self.count), dtype=torch.float64, device=self.device)])
        all_reduce_sum(packed, group)
        self.reset()
        total, count = packed.tolist()
        return total / count if count > 0 else None


def is_adaptive_warmup_config(ds_config: dict[str, Any]) -> bool:
    """True when the config's ``scheduler`` section selects AdaptiveWarmup (type compared case-insensitively)."""
    section = ds_config.get("scheduler")
    return isinstance(section, dict) and str(section.get("type", "")).lower() == SCHEDULER_TYPE.lower()


def take_adaptive_warmup(ds_config: dict[str, Any]) -> AdaptiveWarmupConfig | None:
    """Remove an AdaptiveWarmup ``scheduler`` section from ``ds_config`` (edited) and return its validated params;
    None (config untouched) for any other scheduler or none.

    Raises:
        AdaptiveWarmupConfigError: unknown section keys, invalid params, or ``total_num_steps`` still ``"auto"``.
    """
    if not is_adaptive_warmup_config(ds_config):
        return None
    section = ds_config["scheduler"]
    unknown = sorted(set(section) - SECTION_KEYS)
    if unknown:
        raise AdaptiveWarmupConfigError("invalid AdaptiveWarmup config:\n" + "\n".join(
            f"  scheduler.{k}: unknown key (the section takes 'type' and 'params')" for k in unknown))
    cfg = parse_adaptive_warmup(section.get("params"))
    if cfg.total_num_steps == AUTO:
        raise AdaptiveWarmupConfigError(
            "invalid AdaptiveWarmup config:\n  scheduler.params.total_num_steps: 'auto' is not resolved: give the "
            "run's optimizer steps (the lab's resolve_config fills it from epochs x steps per epoch)")
    del ds_config["scheduler"]
    return cfg


def initialize_with_scheduler(initialize: Initialize, passthrough: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """Run ``initialize(passthrough)`` (the body of ``ds_spngd.initialize``, deepspeed.initialize's arguments by name),
    with an AdaptiveWarmup ``scheduler`` section of the config turned into ``lr_scheduler=`` and glued to the engine
    (module docstring). Any other config goes to ``initialize`` untouched.

    Raises:
        AdaptiveWarmupConfigError: an invalid AdaptiveWarmup section (before anything is built).
        ValueError: the config selects AdaptiveWarmup and an ``lr_scheduler`` was passed as well.
    """
    from ds_spngd.integrations.deepspeed.build import load_ds_config  # build imports this module

    args = passthrough.get("args")
    source = passthrough.get("config")
    source = passthrough.get("config_params") if source is None else source
    args_config = getattr(args, "deepspeed_config", None) if args is not None else None
    source = args_config if source is None else source
    if source is None:
        return initialize(passthrough)
    ds_config = load_ds_config(source)
    cfg = take_adaptive_warmup(ds_config)
    if cfg is None:
        return initialize(passthrough)
    if passthrough.get("lr_scheduler") is not None:
        raise ValueError("the config selects scheduler type AdaptiveWarmup, but an lr_scheduler was passed as well")
    built: list[AdaptiveWarmup] = []

    def make_scheduler(optimizer: torch.optim.Optimizer) -> AdaptiveWarmup:  # DeepSpeed calls it with basic_optimizer
        built.append(AdaptiveWarmup(optimizer, cfg))
        return built[-1]

    ds_args = without_config_path(args) if args_config is not None else args
    out = initialize({**passthrough, "args": ds_args, "config": ds_config, "config_params": None,
                      "lr_scheduler": make_scheduler})
    engine = out[0]
    if not built or getattr(engine, "lr_scheduler", None) is not built[-1]:
        raise RuntimeError("DeepSpeed did not build the AdaptiveWarmup scheduler from lr_scheduler= (no optimizer?)")
    attach_adaptive_warmup(engine, built[-1])
    return out


def attach_adaptive_warmup(engine: Any, scheduler: AdaptiveWarmup) -> None:
    """Feed the step's mean loss over all data-parallel ranks to ``scheduler`` (the engine's ``lr_scheduler``),
    make its test outcomes identical on every rank, and log it to the monitor (module docstring)."""
    group = getattr(engine, "data_parallel_group", None)
    device = torch.device(engine.device)
    scheduler.agree = _first_rank_decides(group, device)
    acc = _LossSum(device)
    plain_backward, plain_step = engine.backward, engine.step

    def backward(loss: torch.Tensor, *a: Any, **k: Any) -> Any:
        out = plain_backward(loss, *a, **k)
        acc.add(loss)
        return out

    def step(*a: Any, **k: Any) -> Any:
        managed = getattr(engine, "managed_gradient_accumulation", lambda: True)()
        boundary = bool(engine.is_gradient_accumulation_boundary()) or not managed
        loss = acc.agreed_mean(group) if boundary else None
        if loss is not None:
            scheduler.observe(loss)
        elif boundary and not acc.warned:
            acc.warned = True
            logger.warning("AdaptiveWarmup: no loss went through engine.backward before this step; steps without "
                           "one are not observed (warmup then ends only at its cap)")
        out = plain_step(*a, **k)
        if boundary:
            _write_events(engine, scheduler, loss)
        return out

    engine.backward = backward  # PATCHES: engine.backward
    engine.step = step  # PATCHES: engine.step


def _first_rank_decides(group: Any, device: torch.device) -> Callable[[bool, float], tuple[bool, float]] | None:
    """The scheduler's ``agree`` hook: the group's first rank's (passed, ratio) broadcast to every rank; None with one
    rank."""
    if world_size(group) == 1:
        return None

    def agree(passed: bool, ratio: float) -> tuple[bool, float]:
        t = torch.tensor([1.0 if passed else 0.0, ratio], dtype=torch.float64, device=device)
        broadcast(t, 0, group)
        flag, value = t.tolist()
        return flag > 0.5, value

    return agree


def _write_events(engine: Any, scheduler: AdaptiveWarmup, loss: float | None) -> None:
    """``AdaptiveWarmup/*`` scalars of this step to the engine's monitor (when one is enabled)."""
    monitor = getattr(engine, "monitor", None)
    if monitor is None or not getattr(monitor, "enabled", False):
        return
    samples = engine.global_samples
    events = [("AdaptiveWarmup/lr", float(scheduler.get_last_lr()[0]), samples)]
    if loss is not None:
        events.append(("AdaptiveWarmup/loss", loss, samples))
    if scheduler.warmup_steps_found is not None and scheduler.peak_lr is not None:
        events += [("AdaptiveWarmup/warmup_steps", float(scheduler.warmup_steps_found), samples),
                   ("AdaptiveWarmup/peak_lr", scheduler.peak_lr, samples)]
    monitor.write_events(events)
