"""Large-batch learning-rate rules and resolution of a DeepSpeed JSON config for one run.

Config section (a top-level key of the DeepSpeed JSON; DeepSpeed ignores unknown top-level keys)::

    "batch_scaling": {"base_lr": 0.1, "base_batch_size": 256, "rule": "linear", "warmup_epochs": 2}

Rules, with ``B`` the global batch (``train_batch_size``) and ``B0 = base_batch_size``:

* ``linear`` (Goyal et al. 2017, arXiv:1706.02677): ``lr = base_lr * B / B0``, warm-up ``warmup_epochs``.
* ``sqrt`` (LEGW, You et al. 2019, arXiv:1901.08256): ``lr = base_lr * sqrt(B / B0)``, warm-up
  ``warmup_epochs * B / B0`` epochs.
* ``none``: ``lr = base_lr``, warm-up ``warmup_epochs``.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SECTION = "batch_scaling"
AUTO = "auto"
_STEP_KEYS = ("total_num_steps", "total_iters")


class BatchScaling(BaseModel):
    """Schema of the ``batch_scaling`` section (unknown keys are rejected).

    Attributes:
        base_lr: learning rate tuned at ``base_batch_size`` (> 0).
        base_batch_size: reference global batch in samples (> 0).
        rule: ``linear`` | ``sqrt`` | ``none``.
        warmup_epochs: warm-up length at the base batch, in epochs (>= 0).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_lr: float = Field(gt=0)
    base_batch_size: int = Field(gt=0)
    rule: Literal["linear", "sqrt", "none"] = "linear"
    warmup_epochs: float = Field(default=0.0, ge=0)

    def lr(self, global_batch: int) -> float:
        """Peak learning rate at global batch ``global_batch`` (> 0) under :attr:`rule`."""
        ratio = _ratio(global_batch, self.base_batch_size)
        if self.rule == "linear":
            return self.base_lr * ratio
        if self.rule == "sqrt":
            return self.base_lr * math.sqrt(ratio)
        return self.base_lr

    def warmup(self, global_batch: int) -> float:
        """Warm-up length in epochs at global batch ``global_batch`` (scaled by ``B / B0`` only for ``sqrt``)."""
        ratio = _ratio(global_batch, self.base_batch_size)
        return self.warmup_epochs * ratio if self.rule == "sqrt" else self.warmup_epochs


def _ratio(global_batch: int, base: int) -> float:
    if global_batch <= 0:
        raise ValueError(f"global batch must be positive, got {global_batch}")
    return global_batch / base


def batch_layout(ds_config: dict[str, Any], world_size: int) -> tuple[int, int, int]:
    """``(train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps)`` implied by a config.

    Any two of the three determine the third (DeepSpeed requires ``train = micro * gas * world``); a missing
    ``gradient_accumulation_steps`` defaults to 1.

    Raises:
        ValueError: if neither batch size is given, a value is not a positive integer, or they are inconsistent.
    """
    if world_size <= 0:
        raise ValueError(f"world size must be positive, got {world_size}")
    values: dict[str, int | None] = {}
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = ds_config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
        values[key] = value
    train = values["train_batch_size"]
    micro = values["train_micro_batch_size_per_gpu"]
    gas = values["gradient_accumulation_steps"]
    if train is None:
        if micro is None:
            raise ValueError("the config needs train_batch_size or train_micro_batch_size_per_gpu")
        gas = gas or 1
        return micro * gas * world_size, micro, gas
    if micro is None:
        gas = gas or 1
        return train, _divide(train, gas * world_size, gas, world_size), gas
    if gas is None:
        if train % (micro * world_size):
            raise ValueError(
                f"train_batch_size {train} is not divisible by micro batch {micro} x world size {world_size}"
            )
        return train, micro, train // (micro * world_size)
    if train != micro * gas * world_size:
        raise ValueError(
            f"train_batch_size {train} != train_micro_batch_size_per_gpu {micro} x gradient_accumulation_steps "
            f"{gas} x world size {world_size}"
        )
    return train, micro, gas


def _divide(train: int, denom: int, gas: int, world_size: int) -> int:
    if train % denom:
        raise ValueError(
            f"global batch {train} is not divisible by gradient_accumulation_steps {gas} x world size {world_size} "
            f"= {denom}; DeepSpeed needs train_batch_size = micro x gas x world"
        )
    return train // denom


def resolve_config(
    ds_config: dict[str, Any],
    global_batch: int | None,
    steps_per_epoch: int,
    epochs: float,
    world_size: int = 1,
) -> dict[str, Any]:
    """Return a new DeepSpeed config dict with batch sizes, the scaled LR and ``"auto"`` scheduler fields filled.

    Args:
        ds_config: the parsed DeepSpeed JSON (not modified).
        global_batch: override of ``train_batch_size`` in samples, or ``None`` to keep the config's.
        steps_per_epoch: optimizer steps per epoch at the resolved global batch (> 0).
        epochs: training length in epochs (> 0), for ``total_num_steps`` / ``total_iters``.
        world_size: data-parallel ranks, to derive ``train_micro_batch_size_per_gpu``.

    Effects on the returned dict: ``train_batch_size``, ``train_micro_batch_size_per_gpu`` and
    ``gradient_accumulation_steps`` are all set consistently; with a ``batch_scaling`` section,
    ``optimizer.params.lr`` becomes the scaled LR; scheduler params equal to ``"auto"`` are filled:
    ``total_num_steps`` / ``total_iters`` = ``ceil(epochs * steps_per_epoch)``, ``warmup_num_steps`` =
    ``max(1, round(warmup_epochs * steps_per_epoch))``, ``warmup_max_lr`` = optimizer lr, ``warmup_min_lr`` = 0;
    ``growth`` / ``check_every`` = ``"auto"`` of an ``AdaptiveWarmup`` scheduler are left for the scheduler.
    The ``batch_scaling`` section is kept.

    Raises:
        ValueError: inconsistent / indivisible batch sizes, a bad ``batch_scaling`` section (pydantic message),
            ``batch_scaling`` without an ``optimizer`` section, an ``"auto"`` value that cannot be resolved (unknown
            key, warm-up without ``batch_scaling``, LR without an optimizer lr), or non-positive epochs / steps.
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    cfg = copy.deepcopy(ds_config)
    if global_batch is not None:
        if global_batch <= 0:
            raise ValueError(f"global batch must be positive, got {global_batch}")
        gas = cfg.get("gradient_accumulation_steps") or 1
        if not isinstance(gas, int) or isinstance(gas, bool) or gas <= 0:
            raise ValueError(f"gradient_accumulation_steps must be a positive integer, got {gas!r}")
        micro = _divide(global_batch, gas * world_size, gas, world_size)
        cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"] = global_batch, micro
    train, micro, gas = batch_layout(cfg, world_size)
    cfg.update(train_batch_size=train, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=gas)

    scaling = BatchScaling.model_validate(cfg[SECTION]) if SECTION in cfg else None
    optimizer = cfg.get("optimizer")
    if scaling is not None:
        if not isinstance(optimizer, dict):
            raise ValueError(f"a '{SECTION}' section needs an 'optimizer' section whose params.lr it sets")
        optimizer.setdefault("params", {})["lr"] = scaling.lr(train)
    opt_lr = optimizer.get("params", {}).get("lr") if isinstance(optimizer, dict) else None

    scheduler = cfg.get("scheduler")
    if isinstance(scheduler, dict):
        params = scheduler.get("params", {})
        for key, value in list(params.items()):
            if value != AUTO:
                continue
            if key in _STEP_KEYS:
                params[key] = max(1, math.ceil(epochs * steps_per_epoch))
            elif key == "warmup_num_steps":
                if scaling is None:
                    raise ValueError(f"scheduler.params.warmup_num_steps='auto' needs a '{SECTION}' section")
                params[key] = max(1, round(scaling.warmup(train) * steps_per_epoch))
            elif key == "warmup_max_lr":
                if not isinstance(opt_lr, (int, float)):
                    raise ValueError("scheduler.params.warmup_max_lr='auto' needs optimizer.params.lr")
                params[key] = float(opt_lr)
            elif key == "warmup_min_lr":
                params[key] = 0.0
            elif key in ("growth", "check_every") and str(scheduler.get("type", "")).lower() == "adaptivewarmup":
                continue  # ds_spngd.schedules.AdaptiveWarmup resolves these itself
            else:
                raise ValueError(f"scheduler.params.{key}='auto' cannot be resolved (no rule for this key)")
    return cfg
