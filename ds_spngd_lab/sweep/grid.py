"""The run list of a scaling sweep and the DeepSpeed JSON of each run.

A sweep is the grid ``optimizer × global batch × learning-rate multiplier × world size``. Every run starts from one of
the shipped configs in ``ds_configs/`` and changes only what the grid says:

* **Batch layout.** ``train_batch_size = B``; ``train_micro_batch_size_per_gpu`` is ``B / (world · gas)`` with the
  smallest gradient-accumulation count ``gas`` that keeps the micro-batch at most ``max_micro_batch``, so a batch of
  16384 on 2 CPU ranks runs as 4 accumulated micro-batches of 2048 per rank, and the optimizer sees one batch of B.
* **Learning rate.** Each optimizer has a base LR at a base batch and a scaling rule (``batch_scaling``,
  :mod:`ds_spngd_lab.schedules.scaling`): linear for momentum SGD and LARS (Goyal et al. 2017, arXiv:1706.02677:
  ``lr = base · B / B0`` with a warm-up), square root for LAMB (LEGW, You et al. 2019, arXiv:1901.08256) and
  SP-NGD (whose configs have no rule; Osawa et al. 2019 tune it per batch). The grid multiplies that rule's LR by
  each multiplier in turn (``base_lr ← m · base_lr``), so the sweep tunes the LR per batch size itself around the
  rule; ``train.py`` resolves the rule, the warm-up and the ``"auto"`` scheduler fields as for any run.
* **Monitoring.** DeepSpeed's ``wandb`` monitor section (project, one group per sweep) and, on two or more ranks at
  ZeRO stage 0, the ``gradient_noise_scale`` section (B_simple of McCandlish et al. 2018, arXiv:1812.06162,
  :mod:`ds_spngd.integrations.deepspeed.noise_scale`).

Optimizers (``OPTIMIZERS``): ``sgd`` — momentum SGD with Goyal's linear scaling and warm-up; ``lars`` — LARS (You,
Gitman & Ginsburg 2017, arXiv:1708.03888); ``lamb`` — LAMB (You et al. 2020, arXiv:1904.00962); ``spngd`` —
SP-NGD (Osawa et al. 2019, arXiv:1811.12019). Variants of those with one section replaced (issue 18's evidence):
``*_aw`` — the ``AdaptiveWarmup`` scheduler (Kim et al. 2021, arXiv:2107.05855; the rule's LR is its ceiling) instead
of the tuned warm-up; ``*_conadv`` — concurrent adversarial training (Liu et al. 2021, arXiv:2106.00221,
:mod:`ds_spngd_lab.adversarial`); ``decentlam`` / ``dmsgd`` — decentralized momentum SGD over a ring (Yuan et al.
2021, arXiv:2104.11981) with SGD-Goyal's rule.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds_spngd_lab.schedules.scaling import SECTION as SCALING_SECTION
from ds_spngd_lab.schedules.scaling import BatchScaling

__all__ = ["OPTIMIZERS", "OptimizerSpec", "RunSpec", "build_grid", "eval_interval", "micro_layout", "peak_lr",
           "run_config"]  # fmt: skip

CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer of the sweep.

    Attributes:
        key: short name used on the command line and in run ids (``sgd``, ``lars``, ``lamb``, ``spngd``).
        label: name in tables and figures.
        config: base DeepSpeed JSON file name in ``ds_configs/``.
        scaling: the ``batch_scaling`` section to use when the base config has none (None: keep the config's).
        sections: top-level sections that replace the base config's (a variant of a shipped config).
    """

    key: str
    label: str
    config: str
    scaling: dict[str, Any] | None = None
    sections: dict[str, Any] | None = None


# spngd.json's lr 0.2 was tuned at batch 1024 (README results); sqrt scaling around it, 10-step warm-up kept
_SPNGD_SCALING = {"base_lr": 0.2, "base_batch_size": 1024, "rule": "sqrt", "warmup_epochs": 0.0}
# ds_configs/sgd_adaptive_warmup.json's scheduler; the batch_scaling rule's LR becomes its ceiling
_ADAPTIVE = {"type": "AdaptiveWarmup", "params": {
    "total_num_steps": "auto", "min_lr_ratio": 1e-4, "max_warmup_fraction": 0.5, "check_every": "auto",
    "min_points": 15, "window": 100, "patience": 3, "decay": "cosine", "final_lr_ratio": 0.0}}
_CONADV = {"enabled": True, "mode": "conadv", "epsilon": 0.03, "steps": 1, "clean_weight": 0.5}

OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec("sgd", "SGD-Goyal", "sgd.json"),
    "lars": OptimizerSpec("lars", "LARS", "lars.json"),
    "lamb": OptimizerSpec("lamb", "LAMB", "lamb.json"),
    "spngd": OptimizerSpec("spngd", "SP-NGD", "spngd.json", _SPNGD_SCALING),
    "sgd_aw": OptimizerSpec("sgd_aw", "SGD + AdaptiveWarmup", "sgd.json", sections={"scheduler": _ADAPTIVE}),
    "lamb_aw": OptimizerSpec("lamb_aw", "LAMB + AdaptiveWarmup", "lamb.json", sections={"scheduler": _ADAPTIVE}),
    "spngd_aw": OptimizerSpec("spngd_aw", "SP-NGD + AdaptiveWarmup", "spngd.json", _SPNGD_SCALING,
                              {"scheduler": _ADAPTIVE}),
    "lamb_conadv": OptimizerSpec("lamb_conadv", "LAMB + ConAdv", "lamb.json", sections={"adversarial": _CONADV}),
    "spngd_conadv": OptimizerSpec("spngd_conadv", "SP-NGD + ConAdv", "spngd.json", _SPNGD_SCALING,
                                  {"adversarial": _CONADV}),
    "decentlam": OptimizerSpec("decentlam", "DecentLaM (ring)", "decentlam.json"),
    "dmsgd": OptimizerSpec("dmsgd", "DmSGD (ring)", "dmsgd.json"),
}


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid (everything ``train.py`` needs besides the generated JSON).

    Attributes:
        optimizer: key of :data:`OPTIMIZERS`.
        batch: global batch B (samples per optimizer step).
        lr_mult: multiplier of the optimizer's rule LR at B.
        world: data-parallel ranks (``deepspeed --num_gpus``).
        micro: micro-batch per rank; ``gas``: gradient accumulation steps (``B = micro · gas · world``).
        epochs: training length in epochs.
        eval_interval: evaluate every this many optimizer steps.
    """

    optimizer: str
    batch: int
    lr_mult: float
    world: int
    micro: int
    gas: int
    epochs: float
    eval_interval: int

    @property
    def run_id(self) -> str:
        """File-system-safe unique name, e.g. ``spngd_b4096_lr0.5_w2``."""
        return f"{self.optimizer}_b{self.batch}_lr{self.lr_mult:g}_w{self.world}"

    @property
    def label(self) -> str:
        """The optimizer's display name."""
        return OPTIMIZERS[self.optimizer].label


def micro_layout(batch: int, world: int, max_micro_batch: int) -> tuple[int, int]:
    """``(micro, gas)`` with ``micro · gas · world == batch``, the smallest such ``gas`` with ``micro <=
    max_micro_batch``.

    Raises:
        ValueError: non-positive sizes, or ``batch`` not divisible by ``world · gas`` for any admissible ``gas``.
    """
    if min(batch, world, max_micro_batch) <= 0:
        raise ValueError(f"sizes must be positive, got batch={batch} world={world} max_micro={max_micro_batch}")
    if batch % world:
        raise ValueError(f"global batch {batch} is not divisible by the world size {world}")
    per_rank = batch // world
    for gas in range(math.ceil(per_rank / max_micro_batch), per_rank + 1):
        if per_rank % gas == 0:
            return per_rank // gas, gas
    raise ValueError(f"no micro-batch <= {max_micro_batch} divides {per_rank}")  # unreachable: gas = per_rank


def eval_interval(batch: int, n_train: int, evals_per_epoch: int) -> int:
    """Optimizer steps between evaluations: about ``evals_per_epoch`` per epoch, at least every step."""
    if min(batch, n_train, evals_per_epoch) <= 0:
        raise ValueError("batch, n_train and evals_per_epoch must be positive")
    return max(1, (n_train // batch) // evals_per_epoch)


def build_grid(optimizers: Sequence[str], batches: Sequence[int], lr_mults: Sequence[float], worlds: Sequence[int],
               epochs: float, max_micro_batch: int, n_train: int, evals_per_epoch: int) -> list[RunSpec]:
    """Every run of the grid, ordered by world size, batch, optimizer, then LR multiplier.

    Raises:
        ValueError: an unknown optimizer, an empty axis, a non-positive value or a batch the layout cannot split.
    """
    unknown = [o for o in optimizers if o not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"unknown optimizer(s) {unknown}; choose from {sorted(OPTIMIZERS)}")
    if not (optimizers and batches and lr_mults and worlds):
        raise ValueError("every axis of the grid needs at least one value")
    if epochs <= 0 or any(m <= 0 for m in lr_mults):
        raise ValueError("epochs and learning-rate multipliers must be positive")
    runs = []
    for world, batch, opt, mult in itertools.product(worlds, batches, optimizers, lr_mults):
        micro, gas = micro_layout(batch, world, max_micro_batch)
        runs.append(RunSpec(opt, batch, float(mult), world, micro, gas, epochs,
                            eval_interval(batch, n_train, evals_per_epoch)))
    return runs


def base_config(optimizer: str, config_dir: Path = CONFIG_DIR) -> dict[str, Any]:
    """The parsed base JSON of ``optimizer`` with its ``batch_scaling`` section (the spec's when it has none)."""
    import json

    spec = OPTIMIZERS[optimizer]
    cfg: dict[str, Any] = json.loads((config_dir / spec.config).read_text(encoding="utf-8"))
    cfg.update(copy.deepcopy(spec.sections or {}))
    if SCALING_SECTION not in cfg:
        if spec.scaling is None:
            raise ValueError(f"{spec.config} has no '{SCALING_SECTION}' section and the sweep gives none")
        cfg[SCALING_SECTION] = dict(spec.scaling)
    return cfg


def run_config(run: RunSpec, base: dict[str, Any], project: str, group: str, wandb: bool = True) -> dict[str, Any]:
    """The DeepSpeed JSON of ``run``: ``base`` (see :func:`base_config`; not modified) with the batch layout, the
    multiplied ``batch_scaling.base_lr``, the ``wandb`` monitor section and, where measurable, the gradient noise
    scale section."""
    cfg = copy.deepcopy(base)
    cfg.update(train_batch_size=run.batch, train_micro_batch_size_per_gpu=run.micro,
               gradient_accumulation_steps=run.gas)  # fmt: skip
    scaling = dict(cfg[SCALING_SECTION])
    scaling["base_lr"] = float(scaling["base_lr"]) * run.lr_mult
    cfg[SCALING_SECTION] = scaling
    if wandb:
        cfg["wandb"] = {"enabled": True, "project": project, "group": group}
    stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
    # B_simple needs b < B and whole local gradients (ds_spngd.integrations.deepspeed.noise_scale), and DeepSpeed's
    # all-reduce, which the decentralized optimizers turn off
    decentralized = str(cfg["optimizer"].get("type", "")).lower() in ("decentlam", "dmsgd")
    if run.world >= 2 and stage == 0 and not decentralized:
        cfg["gradient_noise_scale"] = {"enabled": True, "ema": 0.95}
    return cfg


def peak_lr(cfg: dict[str, Any], batch: int) -> float:
    """The peak LR ``train.py`` will use at global batch ``batch`` (the ``batch_scaling`` rule; else the JSON lr)."""
    if SCALING_SECTION in cfg:
        return BatchScaling.model_validate(cfg[SCALING_SECTION]).lr(batch)
    return float(cfg["optimizer"]["params"]["lr"])
