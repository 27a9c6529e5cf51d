"""AdaptiveWarmup: an LR scheduler whose warmup ends when the training loss stops decreasing, then decays to the end.

Kim, Kim, Kim, Lee & Kim, "Automated Learning Rate Scheduler for Large-batch Training", arXiv:2107.05855 (AutoWU;
8th ICML AutoML workshop, 2021), with the authors' code github.com/kakaobrain/autowu as the reference for details the
paper leaves out. Two phases, no warmup length or peak LR to tune; every LR is a ratio ``r_t`` of each parameter
group's own base LR (its ``lr`` when the scheduler is built; the paper's "maximum LR"):

1. **Warmup, exponential growth** (paper, "Warmup by exponential schedule"): ``r_t = min(1, min_lr_ratio *
   growth**t)`` at optimizer step ``t = 0, 1, ...``; ``growth = "auto"`` reaches 1 exactly at the cap
   ``max_warmup_steps = floor(max_warmup_fraction * total_num_steps)`` (the reference's rule: exponential from the
   initial to the maximum LR over the maximum warmup fraction).
2. **Minimum test** (paper, "Online minimum detection via Gaussian process"): the caller feeds each step's training
   loss with :meth:`observe`; after every ``check_every`` new losses (``"auto"``: about 40 tests over the capped
   warmup), once ``min_points`` are in hand, a GP fitted to the last ``window`` losses tests whether the smoothed
   loss has passed its minimum, ``max_{i<k} P(f_i < f_k) > confidence``
   (:func:`ds_spngd.schedules.gp_minimum.past_minimum_test`). After ``patience`` consecutive passed tests, warmup
   ends: the **peak** ratio is the warmup ratio at the step where the GP posterior mean of the loss was lowest (as
   the reference code does; not the larger ratio reached when the test fired), and the decay starts at the next step.
   At the cap the decay starts from the ratio reached there. Non-finite losses are left out of the fit (reference).
3. **Decay** (paper abstract: "decreased to zero until the end of training"; reference: immediate cosine):
   from ``peak`` at the first decay step ``s`` to ``final_lr_ratio * peak`` at ``T = total_num_steps``, cosine
   ``final + (peak - final) * (1 + cos(pi * p)) / 2`` or linear ``peak - (peak - final) * p`` with
   ``p = (t - s) / (T - s)``; held there after ``T``.

Usage, with any torch optimizer (DeepSpeed: JSON ``"scheduler": {"type": "AdaptiveWarmup"}`` through
``ds_spngd.initialize``, :mod:`ds_spngd.integrations.deepspeed.schedulers`)::

    sched = AdaptiveWarmup(optimizer, total_num_steps=1000)
    for batch in batches:
        loss = ...; loss.backward(); optimizer.step(); optimizer.zero_grad()
        sched.observe(loss.item())  # this step's loss (the same value on every data-parallel rank)
        sched.step()

**Ranks.** The decision is a deterministic function of the observed losses, so data-parallel ranks that observe the
same value (e.g. the all-reduced mean loss) end warmup on the same step; an ``agree`` callback (set by the DeepSpeed
glue: a broadcast from the first rank) makes every test's outcome identical even if floating-point results of the fit
differed between machines.

Imports no DeepSpeed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from ds_spngd.schedules.gp_minimum import past_minimum_test
from ds_spngd.schedules.warmup_config import (
    AUTO,
    TESTS_PER_WARMUP,
    AdaptiveWarmupConfig,
    AdaptiveWarmupConfigError,
    parse_adaptive_warmup,
)

__all__ = ["AdaptiveWarmup", "Agree"]

Agree = Callable[[bool, float], tuple[bool, float]]  # (test passed, ratio at the minimum) -> the value all ranks use
WARMUP, DECAY = "warmup", "decay"
_STATE_VERSION = 1
# attributes saved by state_dict (besides the config): exact resume, the loss history and the phase included
_STATE_KEYS = ("base_lrs", "last_epoch", "_step_count", "_last_lr", "phase", "growth", "check_every",
               "max_warmup_steps", "steps", "losses", "ratios", "pending", "since_check", "passes", "decay_start",
               "peak_ratio", "last_test")


class AdaptiveWarmup(LRScheduler):
    """LR scheduler of AutoWU (Kim et al., arXiv:2107.05855): exponential warmup until a Gaussian-process test says
    the training loss stopped decreasing, then cosine or linear decay to ``final_lr_ratio`` x peak at
    ``total_num_steps`` (see the module docstring for the exact rule).

    Call :meth:`observe` with the step's training loss once per optimizer step, before :meth:`step`.

    Args:
        optimizer: any ``torch.optim.Optimizer``; each param group's ``lr`` when the scheduler is built is its base
            (maximum) LR.
        config: an :class:`AdaptiveWarmupConfig` or a mapping of its keys (``params`` are merged over it).
        agree: optional callback making a test's outcome identical on every rank (see the module docstring).
        **params: :class:`AdaptiveWarmupConfig` keys.

    Raises:
        AdaptiveWarmupConfigError: invalid parameters, or ``total_num_steps`` still ``"auto"``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: AdaptiveWarmupConfig | Mapping[str, Any] | None = None,
                 *, agree: Agree | None = None, **params: Any) -> None:
        raw = config.model_dump() if isinstance(config, AdaptiveWarmupConfig) else dict(config or {})
        cfg = parse_adaptive_warmup({**raw, **params})
        if cfg.total_num_steps == AUTO:
            raise AdaptiveWarmupConfigError(
                "invalid AdaptiveWarmup config:\n  scheduler.params.total_num_steps: 'auto' must be filled before the "
                "scheduler is built (the lab's resolve_config fills it from epochs x steps per epoch); give an integer")
        self.cfg = cfg
        self.agree = agree
        total = int(cfg.total_num_steps)
        self.max_warmup_steps = int(math.floor(cfg.max_warmup_fraction * total))
        self.growth = (float(cfg.growth) if cfg.growth != AUTO
                       else (1.0 / cfg.min_lr_ratio) ** (1.0 / max(self.max_warmup_steps, 1)))
        self.check_every = (int(cfg.check_every) if cfg.check_every != AUTO
                            else max(1, round(self.max_warmup_steps / TESTS_PER_WARMUP)))
        self.phase = WARMUP if self.max_warmup_steps > 0 else DECAY
        self.steps: list[int] = []  # the window: step, loss and LR ratio of the latest warmup losses
        self.losses: list[float] = []
        self.ratios: list[float] = []
        self.pending: list[float] | None = None  # [step, loss] observed for the step not yet stepped
        self.since_check = 0
        self.passes = 0
        self.decay_start: int | None = None if self.phase == WARMUP else 0
        self.peak_ratio: float | None = None if self.phase == WARMUP else 1.0
        self.last_test: dict[str, float] | None = None
        self._ready = False
        super().__init__(optimizer)
        self._ready = True

    # ---- public API --------------------------------------------------------------------------------------------
    def observe(self, loss: float | torch.Tensor) -> None:
        """Record the training loss of the current optimizer step (the step whose update used the current LR).

        Call once per optimizer step, before :meth:`step`; a second call before :meth:`step` replaces the first
        (e.g. a step DeepSpeed skipped for an fp16 overflow and whose scheduler step never came). Ignored after
        warmup. For data-parallel training pass the same value on every rank (the mean over ranks).
        """
        self.pending = [float(self.last_epoch), float(loss)]

    def step(self, epoch: int | None = None) -> None:
        """Advance one optimizer step: take the observed loss, run the minimum test when due (possibly ending
        warmup), and set every group's LR for the next step.

        Raises:
            ValueError: ``epoch`` given (the schedule depends on the loss history, it cannot jump).
        """
        if epoch is not None:
            raise ValueError("AdaptiveWarmup.step() takes no epoch: the schedule depends on the observed losses")
        if self._ready:
            self._advance()
        super().step()

    def get_lr(self) -> list[float | torch.Tensor]:
        """Each group's LR at step ``last_epoch``: its base LR times :meth:`ratio_at`."""
        ratio = self.ratio_at(self.last_epoch)
        lrs: list[float | torch.Tensor] = [float(base) * ratio for base in self.base_lrs]
        return lrs

    def ratio_at(self, step: int) -> float:
        """The LR ratio (of the base LR) at optimizer ``step`` under the current phase (warmup: the growth rule)."""
        if self.phase == WARMUP or self.decay_start is None or self.peak_ratio is None:
            return self._warmup_ratio(step)
        peak, final = self.peak_ratio, self.cfg.final_lr_ratio * self.peak_ratio
        span = int(self.cfg.total_num_steps) - self.decay_start
        p = 1.0 if span <= 0 else min(max((step - self.decay_start) / span, 0.0), 1.0)
        if self.cfg.decay == "linear":
            return peak - (peak - final) * p
        return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * p))

    @property
    def warmup_steps_found(self) -> int | None:
        """Optimizer steps spent in warmup (the first decay step), None while warming up."""
        return self.decay_start

    @property
    def peak_lr(self) -> float | None:
        """Peak LR of the first param group (its base LR x :attr:`peak_ratio`), None while warming up."""
        return None if self.peak_ratio is None else float(self.base_lrs[0]) * self.peak_ratio

    @property
    def peak_lrs(self) -> list[float] | None:
        """Peak LR of every param group, None while warming up."""
        return None if self.peak_ratio is None else [float(b) * self.peak_ratio for b in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (ints, floats, strings, lists, dicts): the config, the step, the phase, the loss window
        and the test counters, enough to resume exactly (:meth:`load_state_dict`)."""
        state: dict[str, Any] = {key: _plain(getattr(self, key)) for key in _STATE_KEYS}
        state["base_lrs"] = [float(b) for b in self.base_lrs]
        return {"version": _STATE_VERSION, "config": self.cfg.model_dump(), **state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (config included) and set every group's LR to the restored step's.

        Raises:
            ValueError: not an AdaptiveWarmup state, another version, or another number of param groups.
        """
        if state_dict.get("version") != _STATE_VERSION or not set(_STATE_KEYS) <= set(state_dict):
            raise ValueError("not an AdaptiveWarmup state_dict (version "
                             f"{state_dict.get('version')!r}, expected {_STATE_VERSION})")
        if len(state_dict["base_lrs"]) != len(self.optimizer.param_groups):
            raise ValueError(f"AdaptiveWarmup state has {len(state_dict['base_lrs'])} param groups, the optimizer "
                             f"{len(self.optimizer.param_groups)}")
        self.cfg = parse_adaptive_warmup(state_dict["config"])
        for key in _STATE_KEYS:
            setattr(self, key, _plain(state_dict[key]))
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    # ---- internals ---------------------------------------------------------------------------------------------
    def _warmup_ratio(self, step: int) -> float:
        return min(1.0, self.cfg.min_lr_ratio * self.growth ** step)

    def _advance(self) -> None:
        """Bookkeeping of the step ``last_epoch`` that was just applied (see :meth:`step`)."""
        step, pending, self.pending = self.last_epoch, self.pending, None
        if self.phase != WARMUP:
            return
        if pending is not None and int(pending[0]) == step and math.isfinite(pending[1]):
            self.steps.append(step)
            self.losses.append(pending[1])
            self.ratios.append(self._warmup_ratio(step))
            del self.steps[:-self.cfg.window], self.losses[:-self.cfg.window], self.ratios[:-self.cfg.window]
            self.since_check += 1
        if step + 1 >= self.max_warmup_steps:
            self._start_decay(step + 1, self._warmup_ratio(step + 1))
        elif self.since_check >= self.check_every and len(self.losses) >= self.cfg.min_points:
            self._test(step)

    def _test(self, step: int) -> None:
        """The minimum test on the window; ``patience`` consecutive passes end warmup after ``step``."""
        self.since_check = 0
        result = past_minimum_test(self.steps, self.losses, self.cfg.length_scale)
        passed, at_min = result.probability > self.cfg.confidence, self.ratios[result.argmin]
        if self.agree is not None:
            passed, at_min = self.agree(passed, at_min)
        self.passes = self.passes + 1 if passed else 0
        self.last_test = {"step": float(step), "probability": result.probability, "passed": float(passed),
                          "argmin_step": float(self.steps[result.argmin]), "ratio_at_min": at_min,
                          "noise_std": result.noise_std}
        if self.passes >= self.cfg.patience:
            self._start_decay(step + 1, at_min)

    def _start_decay(self, first_step: int, peak_ratio: float) -> None:
        self.phase, self.decay_start, self.peak_ratio = DECAY, first_step, float(peak_ratio)


def _plain(value: Any) -> Any:
    """A copy of ``value`` made of plain Python objects (tensors become floats / lists)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
