"""ds_spngd: SP-NGD (scalable, practical natural gradient; distributed K-FAC) as a DeepSpeed optimizer.

Public API:
    :class:`SPNGD` — the optimizer (usable without DeepSpeed too).
    :class:`SPNGDConfig`, :class:`SPNGDConfigError` — the JSON schema and its error.
    :class:`SPNGDCheckpointError` — a checkpoint whose SP-NGD shards are missing, unreadable or from another run.
    :func:`initialize` — deepspeed.initialize that understands ``"optimizer": {"type": "SPNGD", "params": {...}}``;
    :func:`get_spngd`, :func:`noise_scale_stats` — read an engine built by it.

The optimizer (this package) imports no DeepSpeed; the DeepSpeed glue lives in :mod:`ds_spngd.integrations.deepspeed`
and is imported on first use of the three names above.
"""

from __future__ import annotations

from typing import Any

from ds_spngd.checkpoint import SPNGDCheckpointError
from ds_spngd.config import SPNGDConfig, SPNGDConfigError
from ds_spngd.optimizer import SPNGD

__all__ = ["SPNGD", "SPNGDCheckpointError", "SPNGDConfig", "SPNGDConfigError", "initialize", "get_spngd",
           "noise_scale_stats"]
__version__ = "0.1.0"

_ENGINE_API = {"initialize", "get_spngd", "noise_scale_stats"}


def __getattr__(name: str) -> Any:
    """``ds_spngd.initialize`` / ``get_spngd`` / ``noise_scale_stats`` from the DeepSpeed integration (lazily, so the
    optimizer alone never imports DeepSpeed)."""
    if name in _ENGINE_API:
        from ds_spngd.integrations import deepspeed as _glue

        return getattr(_glue, name)
    raise AttributeError(f"module 'ds_spngd' has no attribute {name!r}")
