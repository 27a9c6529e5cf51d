"""Learning-rate schedulers usable with any torch optimizer (no DeepSpeed import).

* :class:`AdaptiveWarmup` — AutoWU (Kim et al., arXiv:2107.05855): exponential warmup until a Gaussian-process test
  on the training loss says it stopped decreasing, then cosine / linear decay to the end of the step budget. From a
  DeepSpeed JSON: ``"scheduler": {"type": "AdaptiveWarmup", "params": {...}}`` through ``ds_spngd.initialize``
  (:mod:`ds_spngd.integrations.deepspeed.schedulers`).
"""

from __future__ import annotations

from ds_spngd.schedules.adaptive_warmup import AdaptiveWarmup
from ds_spngd.schedules.gp_minimum import MinimumTest, past_minimum_test
from ds_spngd.schedules.warmup_config import AdaptiveWarmupConfig, AdaptiveWarmupConfigError, parse_adaptive_warmup

__all__ = ["AdaptiveWarmup", "AdaptiveWarmupConfig", "AdaptiveWarmupConfigError", "MinimumTest",
           "parse_adaptive_warmup", "past_minimum_test"]
