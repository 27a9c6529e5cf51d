"""Scaling sweeps logged to Weights & Biases (issue 9): a grid of global batch × optimizer (SGD-Goyal, LARS, LAMB,
SP-NGD) × learning-rate multiplier × world size, each run through the deepspeed launcher and ``train.py``.

* :mod:`ds_spngd_lab.sweep.grid` — the run list and each run's DeepSpeed JSON (batch layout with gradient accumulation,
  LR scaling rules of Goyal et al. 2017 and LEGW, the ``wandb`` monitor section, the gradient noise scale section);
* :mod:`ds_spngd_lab.sweep.runner` — one launch at a time, offline W&B unless logged in, ``/dev/shm`` cleanup of each
  run's own port, one progress line per finished run;
* :mod:`ds_spngd_lab.sweep.report` — the markdown tables, the figures (test error, steps to target with the
  perfect-scaling line and the McCandlish et al. 2018 noise-scale prediction, time to target) and their upload as
  W&B images;
* :mod:`ds_spngd_lab.sweep.cli` — ``python -m ds_spngd_lab.sweep`` / ``python launch/sweep.py``.

The language-model race (``benchmarks/lm_race.py``, ``benchmarks/lm_batch_scaling.py``) has its own modules here:
:mod:`ds_spngd_lab.sweep.lm_runs` (LR / warm-up grids, per-run JSON, resumable launches of ``train_lm.py``),
:mod:`ds_spngd_lab.sweep.lm_report` (best LR per config, the best baseline's loss as target, ratios) and
:mod:`ds_spngd_lab.sweep.lm_scaling` (batch × config × LR grid at a fixed target, B_simple, table and figure).
"""

from ds_spngd_lab.sweep.grid import OPTIMIZERS, RunSpec, build_grid, run_config
from ds_spngd_lab.sweep.runner import SweepSettings, run_sweep

__all__ = ["OPTIMIZERS", "RunSpec", "SweepSettings", "build_grid", "run_config", "run_sweep"]
