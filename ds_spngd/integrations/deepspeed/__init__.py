"""SP-NGD inside DeepSpeed: ``initialize`` and everything that touches DeepSpeed's engine and ZeRO internals.

Modules: :mod:`.engine` (``initialize`` and the engine seam), :mod:`.zero` (gradients of ZeRO 1/2 partitions),
:mod:`.noise_scale` (gradient noise scale around DeepSpeed's all-reduce), :mod:`.first_order` (LARS / Lamb client
optimizers).
"""

from ds_spngd.integrations.deepspeed.engine import get_spngd, initialize
from ds_spngd.integrations.deepspeed.noise_scale import noise_scale_stats

__all__ = ["initialize", "get_spngd", "noise_scale_stats"]
