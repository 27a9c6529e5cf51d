"""Parameters of :class:`ds_spngd.schedules.AdaptiveWarmup` (the ``scheduler.params`` of ``"type": "AdaptiveWarmup"``)
and their validation. Imports no DeepSpeed.

Defaults marked *paper* are those of Kim et al., arXiv:2107.05855, as set in the authors' code
(github.com/kakaobrain/autowu, ``AutoWU`` defaults): initial LR 1e-5 with maximum LR 1.0, warmup capped at half the
steps, confidence 0.95, patience 3, RBF length scale 0.2, cosine decay to zero. The others are this implementation's
choices.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from ds_spngd.config import SPNGDConfigError

__all__ = ["AUTO", "TESTS_PER_WARMUP", "AdaptiveWarmupConfig", "AdaptiveWarmupConfigError", "parse_adaptive_warmup"]

AUTO = "auto"
TESTS_PER_WARMUP = 40  # check_every="auto": minimum tests over the capped warmup (this implementation's choice)


class AdaptiveWarmupConfigError(SPNGDConfigError):
    """Invalid AdaptiveWarmup parameters; the message names every offending key (``scheduler.params.X``). A subclass
    of :class:`ds_spngd.SPNGDConfigError` (a ValueError): one ``except`` catches every config error of
    ``ds_spngd.initialize``."""


class AdaptiveWarmupConfig(BaseModel):
    """AdaptiveWarmup's parameters (unknown keys are rejected). LRs are ratios of each parameter group's own base LR
    (its ``lr`` when the scheduler is built, the "maximum LR" of the paper), like DeepSpeed's ``WarmupCosineLR``.

    Attributes:
        total_num_steps: optimizer steps of the whole run (>= 1), the decay ends there; ``"auto"`` is left for the
            caller to fill (the lab's ``resolve_config`` does, from epochs x steps per epoch) before the scheduler is
            built.
        min_lr_ratio: LR at step 0 as a ratio of the base LR, in (0, 1] (paper: 1e-5 with maximum LR 1).
        growth: LR multiplier per optimizer step during warmup (> 1), or ``"auto"`` (paper): the rate that reaches the
            base LR exactly at the cap, ``(1 / min_lr_ratio) ** (1 / max_warmup_steps)``. The LR never exceeds the
            base LR (an explicit growth that gets there early holds it until the test or the cap ends warmup).
        max_warmup_fraction: cap on warmup, a fraction of ``total_num_steps`` in [0, 1] (paper: 0.5); at the cap the
            decay starts from the LR reached.
        check_every: run the minimum test after every this many new losses (>= 1 optimizer steps), or ``"auto"``:
            ``max(1, round(max_warmup_steps / TESTS_PER_WARMUP))``, about 40 tests over the capped warmup, so the LR
            grows by ``(1 / min_lr_ratio) ** (1 / 40)`` between tests whatever the run length (the paper tests once
            per epoch; a fixed step count would let short runs overshoot by decades before ``patience`` tests pass).
        window: the test fits the GP to the most recent this many warmup losses (>= 3; the paper uses every warmup
            loss, subsampled to 100 points).
        min_points: no test before this many losses are in the window (>= 3, <= window).
        patience: warmup ends after this many consecutive passed tests (>= 1; paper: 3).
        confidence: a test passes when ``max_{i<k} P(f_i < f_k)`` exceeds it, in (0.5, 1) (paper: 0.95).
        length_scale: RBF length scale as a fraction of the window's span of steps (> 0; paper: 0.2 of the history).
        decay: ``"cosine"`` (paper) or ``"linear"`` from the peak LR to ``final_lr_ratio`` x peak at
            ``total_num_steps``.
        final_lr_ratio: LR at ``total_num_steps`` as a ratio of the peak LR, in [0, 1] (paper: 0).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    total_num_steps: StrictInt | Literal["auto"] = "auto"
    min_lr_ratio: float = Field(default=1e-5, gt=0.0, le=1.0)
    growth: float | Literal["auto"] = "auto"
    max_warmup_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    check_every: StrictInt | Literal["auto"] = "auto"
    window: StrictInt = Field(default=200, ge=3)
    min_points: StrictInt = Field(default=20, ge=3)
    patience: StrictInt = Field(default=3, ge=1)
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    length_scale: float = Field(default=0.2, gt=0.0)
    decay: Literal["cosine", "linear"] = "cosine"
    final_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v: Any, info: Any) -> Any:
        # pydantic's lax mode reads JSON true/false as 1/0; no field here is a boolean
        if isinstance(v, bool):
            raise ValueError("expected a number or string, not a boolean")
        return v

    @field_validator("total_num_steps")
    @classmethod
    def _positive_steps(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be a positive integer or 'auto'")
        return v

    @field_validator("check_every")
    @classmethod
    def _positive_interval(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be a positive integer or 'auto'")
        return v

    @field_validator("growth")
    @classmethod
    def _growth_above_one(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and not v > 1.0:
            raise ValueError("must be > 1 (a per-step LR multiplier) or 'auto'")
        return v

    @model_validator(mode="after")
    def _points_fit_window(self) -> AdaptiveWarmupConfig:
        if self.min_points > self.window:
            raise ValueError(f"min_points ({self.min_points}) must be <= window ({self.window})")
        return self


def parse_adaptive_warmup(params: Mapping[str, Any] | None, prefix: str = "scheduler.params") -> AdaptiveWarmupConfig:
    """Validate AdaptiveWarmup parameters (None: every default).

    Args:
        params: the raw mapping (the JSON's ``scheduler.params``).
        prefix: the key path used in error messages.

    Raises:
        AdaptiveWarmupConfigError: one line per unknown key, wrong type or out-of-range value, each named.
    """
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise AdaptiveWarmupConfigError(f"invalid AdaptiveWarmup config: {prefix} must be a JSON object, "
                                        f"got {type(params).__name__}")
    try:
        return AdaptiveWarmupConfig(**params)
    except ValidationError as err:
        messages: dict[str, list[str]] = {}  # key -> messages (a union field reports one per alternative)
        for e in err.errors():
            key = f"{prefix}.{e['loc'][0]}" if e["loc"] else prefix
            if e["type"] == "extra_forbidden":
                text = f"unknown key (the keys are: {', '.join(AdaptiveWarmupConfig.model_fields)})"
            else:
                text = e["msg"].removeprefix("Value error, ")
            messages.setdefault(key, []).append(text)
        got = {f"{prefix}.{k}": v for k, v in params.items()}
        lines = [f"  {key}: {' or '.join(texts)}" + (f" (got {got[key]!r})" if key in got and "unknown key" not in
                                                      texts[0] else "")
                 for key, texts in messages.items()]
        raise AdaptiveWarmupConfigError("invalid AdaptiveWarmup config:\n" + "\n".join(lines)) from None
