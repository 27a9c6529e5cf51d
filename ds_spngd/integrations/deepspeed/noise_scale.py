"""Gradient noise scale B_simple (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
arXiv:1812.06162), measured for free from data-parallel training.

At every gradient-accumulation boundary each rank holds the mean gradient of its own ``b`` samples (``b`` =
micro-batch × gradient accumulation steps) just before DeepSpeed averages gradients across ranks, and the mean
gradient of all ``B = b · world`` samples just after. With ``|G_b|²`` the mean over ranks of the local squared norms
and ``|G_B|²`` the squared norm of the averaged gradient, Appendix A.1 (Eq. A.2, A.3) gives unbiased estimates of the
true gradient's squared norm and of the trace of the per-example gradient covariance::

    |G|² = (B |G_B|² − b |G_b|²) / (B − b)          S = (|G_b|² − |G_B|²) / (1/b − 1/B)

Each is smoothed with an exponential moving average (bias-corrected like Adam's moments) and the noise scale is
their ratio, ``B_simple = S_ema / |G|²_ema`` (the ratio of the averages, not the average of the noisy ratio, as the
paper recommends). With one rank ``b = B`` and nothing is defined: nothing is reported.

Cost: one fused norm over the gradients before and one after DeepSpeed's all-reduce, plus **one extra scalar
all-reduce** per optimizer step (the mean of the local squared norms), issued on every rank at the same point of
``engine.allreduce_gradients()``. Values stay on the device; the host reads them only when they are written to the
monitor or asked for (:func:`noise_scale_stats`).

Supported: ZeRO stage 0 (fp32, bf16, fp16; B_simple does not depend on a loss scale). ZeRO stage >= 1 reduces
gradients inside its own hooks and partitions, so the per-rank full gradient never exists: the measurement is
disabled there with one logged line.

Seams and patches: the config is a top-level JSON section (DeepSpeed accepts unknown top-level keys) and the values go
to ``engine.monitor.write_events``; DeepSpeed has no callback around its all-reduce, so ``engine.allreduce_gradients``
is wrapped on the instance, the estimator is stored as ``engine.noise_scale_estimator`` and BF16_Optimizer's
``get_grads_for_reduction`` is read (entries of :data:`.patches.PATCHES`).

Config (a top-level section of the DeepSpeed JSON, which DeepSpeed 0.19.8 accepts and ignores)::

    "gradient_noise_scale": {"enabled": true, "ema": 0.95}
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from ds_spngd.config import SPNGDConfigError

__all__ = ["SECTION", "NoiseScaleConfig", "NoiseScaleEstimator", "attach_noise_scale", "noise_scale_stats",
           "parse_noise_scale"]  # fmt: skip

logger = logging.getLogger("ds_spngd")

SECTION = "gradient_noise_scale"
MONITOR_NAMES = {"B_simple": "Train/noise_scale_B_simple", "grad_sq_norm_true": "Train/grad_sq_norm_true",
                 "grad_noise_trace": "Train/grad_noise_trace"}  # fmt: skip


class NoiseScaleConfig(BaseModel):
    """The ``gradient_noise_scale`` section.

    Attributes:
        enabled: measure B_simple at every optimizer step.
        ema: EMA coefficient in [0, 1) applied to |G|² and S (0: no smoothing).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: StrictBool = False
    ema: float = Field(0.95, ge=0.0, lt=1.0)

    @field_validator("ema", mode="before")
    @classmethod
    def _no_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("expected a number, got a boolean")
        return v


def parse_noise_scale(ds_config: dict[str, Any]) -> NoiseScaleConfig:
    """Validate the ``gradient_noise_scale`` section of a DeepSpeed config (absent: disabled).

    Raises:
        SPNGDConfigError: naming every offending key (``gradient_noise_scale.<key>``).
    """
    section = ds_config.get(SECTION)
    if section is None:
        return NoiseScaleConfig.model_validate({})
    if not isinstance(section, dict):
        raise SPNGDConfigError(f"{SECTION} must be an object, got {type(section).__name__}")
    try:
        return NoiseScaleConfig.model_validate(section)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            lines.append(f"  {SECTION}.{key}: {e['msg']} (got {e.get('input')!r})")
        raise SPNGDConfigError(f"invalid {SECTION} config:\n" + "\n".join(lines)) from None


class NoiseScaleEstimator:
    """Unbiased |G|² and S from small- and big-batch squared gradient norms (McCandlish et al. 2018, App. A.1,
    Eq. A.2 / A.3), EMA-smoothed with Adam-style bias correction, and B_simple = S_ema / |G|²_ema.

    Args:
        b: samples behind each small-batch gradient (per rank, per optimizer step).
        big_b: samples behind the big-batch gradient (the global batch); must exceed ``b``.
        ema: EMA coefficient in [0, 1).
    """

    def __init__(self, b: int, big_b: int, ema: float = 0.95) -> None:
        if not 0 < b < big_b:
            raise ValueError(f"need 0 < b < B, got b={b}, B={big_b}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must lie in [0, 1), got {ema}")
        self.b, self.big_b, self.beta = b, big_b, ema
        self.steps = 0
        self._ema: torch.Tensor | None = None  # [|G|², S], float64, on the device of the inputs
        self._raw: torch.Tensor | None = None

    def raw_estimates(self, small_sq: torch.Tensor, big_sq: torch.Tensor) -> torch.Tensor:
        """One step's unbiased ``[|G|², S]`` (Eq. A.2, A.3) as a float64 tensor of 2, on the inputs' device."""
        b, big_b = float(self.b), float(self.big_b)
        small, big = small_sq.double(), big_sq.double()
        g2 = (big_b * big - b * small) / (big_b - b)
        s = (small - big) / (1.0 / b - 1.0 / big_b)
        return torch.stack([g2, s])

    def update(self, small_sq: torch.Tensor | float, big_sq: torch.Tensor | float) -> None:
        """Add one step: ``small_sq`` = mean over ranks of |G_b|², ``big_sq`` = |G_B|² (no host sync)."""
        small = torch.as_tensor(small_sq, dtype=torch.float64)
        big = torch.as_tensor(big_sq, dtype=torch.float64, device=small.device)
        raw = self.raw_estimates(small, big)
        self._ema = (1.0 - self.beta) * raw if self._ema is None else self.beta * self._ema + (1.0 - self.beta) * raw
        self._raw = raw
        self.steps += 1

    def stats(self) -> dict[str, float]:
        """The last values as floats (one host read): ``B_simple`` (EMA ratio), ``grad_sq_norm_true`` and
        ``grad_noise_trace`` (bias-corrected EMAs), and the raw step values ``*_raw``; empty before the first step."""
        if self._ema is None or self._raw is None:
            return {}
        correction = 1.0 - self.beta**self.steps
        g2, s, g2_raw, s_raw = torch.cat([self._ema / correction, self._raw]).tolist()
        return {"B_simple": s / g2 if g2 != 0 else math.nan, "grad_sq_norm_true": g2, "grad_noise_trace": s,
                "B_simple_raw": s_raw / g2_raw if g2_raw != 0 else math.nan, "grad_sq_norm_true_raw": g2_raw,
                "grad_noise_trace_raw": s_raw}  # fmt: skip


def _sq_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Squared L2 norm of a list of tensors, fp32 accumulation, one fused op (no host sync)."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms)).square()


def _gradients(engine: Any) -> list[torch.Tensor]:
    """The tensors DeepSpeed's stage-0 all-reduce averages: BF16_Optimizer's fp32 accumulation buffers when it
    is the wrapper (``get_grads_for_reduction``), else the module parameters' ``.grad``."""
    opt: Any = getattr(engine, "optimizer", None)
    if hasattr(opt, "get_grads_for_reduction"):
        grads, _ = opt.get_grads_for_reduction()
        return [g for g in grads if g is not None]
    return [p.grad for p in engine.module.parameters() if p.requires_grad and p.grad is not None]


def noise_scale_stats(engine: Any) -> dict[str, float]:
    """The last gradient-noise-scale values of an engine built by ``ds_spngd.initialize`` (see
    :meth:`NoiseScaleEstimator.stats`); empty when disabled, unsupported (ZeRO >= 1, one rank) or before the first
    optimizer step."""
    est = getattr(engine, "noise_scale_estimator", None)
    return est.stats() if isinstance(est, NoiseScaleEstimator) else {}


def attach_noise_scale(engine: Any, cfg: NoiseScaleConfig) -> NoiseScaleEstimator | None:
    """Wrap ``engine.allreduce_gradients`` to measure the gradient noise scale (done by ``ds_spngd.initialize``).

    Returns the estimator (also ``engine.noise_scale_estimator``), or None when disabled or not measurable (one
    logged line says why).
    """
    if not cfg.enabled:
        return None
    engine.noise_scale_estimator = None
    stage = int(engine.zero_optimization_stage())
    if stage >= 1:
        logger.warning("gradient noise scale disabled: ZeRO stage %d reduces gradients in its own hooks and "
                       "partitions, so no rank holds its local full gradient (supported: stage 0)", stage)
        return None
    world = int(getattr(engine, "dp_world_size", 1) or 1)
    b = int(engine.train_micro_batch_size_per_gpu()) * int(engine.gradient_accumulation_steps())
    if world < 2:
        logger.warning("gradient noise scale disabled: one data-parallel rank (b = B), B_simple is undefined")
        return None
    est = NoiseScaleEstimator(b, b * world, cfg.ema)
    engine.noise_scale_estimator = est
    group = getattr(engine, "data_parallel_group", None)
    orig: Callable[..., Any] = engine.allreduce_gradients
    done = [-1]  # global step already measured (allreduce_gradients may be called again in one step)

    def allreduce_gradients(*a: Any, **k: Any) -> Any:
        if not engine.is_gradient_accumulation_boundary() or done[0] == engine.global_steps:
            return orig(*a, **k)
        done[0] = engine.global_steps
        device = torch.device(engine.device)
        local = _sq_norm(_gradients(engine), device)
        # the one extra collective: a scalar, every rank, every boundary step
        torch.distributed.all_reduce(local, group=group)
        out = orig(*a, **k)
        big = _sq_norm(_gradients(engine), device)
        est.update(local / world, big)
        monitor = getattr(engine, "monitor", None)
        if monitor is not None and getattr(monitor, "enabled", False):
            stats = est.stats()
            samples = engine.global_samples + engine.train_batch_size()  # the value once this step is counted
            monitor.write_events([(name, stats[key], samples) for key, name in MONITOR_NAMES.items()])
        return out

    engine.allreduce_gradients = allreduce_gradients
    logger.info("gradient noise scale: b=%d per rank, B=%d, ema=%s (one scalar all-reduce per step)",
                b, b * world, cfg.ema)
    return est
