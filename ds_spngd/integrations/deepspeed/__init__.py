"""SP-NGD inside DeepSpeed: ``initialize`` and everything that touches DeepSpeed's engine and ZeRO internals.

Modules:

* :mod:`.build` — ``initialize`` (config loading and validation, refusals, SP-NGD as DeepSpeed's client optimizer),
  ``get_spngd``, ``load_ds_config``, ``memory_report``;
* :mod:`.engine` — the engine seam: ``attach`` (forward / backward / step, overflow skips, monitor events);
* :mod:`.checkpoint` — SP-NGD's per-rank shards next to DeepSpeed's checkpoint files;
* :mod:`.zero` — gradients of ZeRO 1/2/3 partitions (:mod:`.zero_layout`: where each parameter's piece lies;
  :mod:`.zero_steps`: DeepSpeed's one-partition-per-call steps made one), their write-back and state re-link;
* :mod:`.construction` — the client optimizer's step is a no-op while DeepSpeed builds its wrappers (both routes);
* :mod:`.noise_scale` — gradient noise scale around DeepSpeed's all-reduce;
* :mod:`.first_order` — LARS / Lamb client optimizers;
* :mod:`.decentralized` — DecentLaM / DmSGD (neighbour averaging on a sparse topology), glued by
  :mod:`.decentralized_engine` (all-reduce off, per-rank checkpoints, consensus evaluation);
* :mod:`.schedulers` — the ``AdaptiveWarmup`` scheduler section (built as ``lr_scheduler=``, fed the agreed loss);
* :mod:`.ds_config` — the few JSON fields the glue decides on;
* :mod:`.patches` — every patch of a DeepSpeed object and every DeepSpeed internal the glue reads, with the DeepSpeed
  lines each relies on and a probe (``tests/integrations/test_patches.py``).

The three public names are imported on first use, so :mod:`.construction` and :mod:`.patches` load without DeepSpeed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ds_spngd.integrations.deepspeed.build import get_spngd, initialize
    from ds_spngd.integrations.deepspeed.noise_scale import noise_scale_stats

__all__ = ["initialize", "get_spngd", "noise_scale_stats"]

_HOME = {"initialize": "build", "get_spngd": "build", "noise_scale_stats": "noise_scale"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
