"""ds_spngd: SP-NGD (scalable, practical natural gradient; distributed K-FAC) as a DeepSpeed optimizer.

Public API:
    :func:`initialize` — deepspeed.initialize that understands ``"optimizer": {"type": "SPNGD", "params": {...}}``.
    :class:`SPNGD` — the optimizer (usable without DeepSpeed too).
    :class:`SPNGDConfig`, :class:`SPNGDConfigError` — the JSON schema and its error.
"""

from ds_spngd.config import SPNGDConfig, SPNGDConfigError
from ds_spngd.integration import get_spngd, initialize
from ds_spngd.noise_scale import noise_scale_stats
from ds_spngd.optimizer import SPNGD

__all__ = ["SPNGD", "SPNGDConfig", "SPNGDConfigError", "initialize", "get_spngd", "noise_scale_stats"]
__version__ = "0.1.0"
