"""A DeepSpeed engine with SP-NGD for a case: the DeepSpeed config, the model, and the optimizer behind the engine."""

from __future__ import annotations

from typing import Any

from torch import nn

import ds_spngd
from ds_spngd import SPNGD
from tests.support.worker.case import Case
from tests.support.worker.net import GLOBAL_BATCH, make_model, param_groups


def ds_config(case: Case, world: int) -> dict[str, Any]:
    """The DeepSpeed config of ``case`` on ``world`` ranks (global batch :data:`GLOBAL_BATCH`, WarmupLR unless the
    groups have their own lrs)."""
    config: dict[str, Any] = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // (world * case.gas),
        "gradient_accumulation_steps": case.gas,
        "zero_optimization": {"stage": case.zero},
        "optimizer": {"type": "SPNGD", "params": {
            "lr": 0.2, "momentum": 0.9, "damping": case.damping, "factor_decay": 0.5, "weight_decay": 1e-3,
            "factor_update_steps": 1, "inv_update_steps": case.inv_update_steps,
            "inverse_method": case.inverse_method,
            "fisher_type": case.fisher_type, "skip_modules": list(case.skip),
            "precondition_mode": case.mode, "comm_dtype": case.comm_dtype,
            "overlap_comm": case.overlap, "bucket_cap_mb": case.bucket_cap_mb,
            "kl_clip": case.kl_clip, "weight_rescale": case.weight_rescale,
            **case.optional_options()}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.02, "warmup_max_lr": 0.2,
                                                      "warmup_num_steps": 4, "warmup_type": "linear"}},
    }
    if case.zero == 3:  # partition every parameter (DeepSpeed keeps ones under 1e5 elements whole by default)
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        if case.sub_group_size is not None:
            config["zero_optimization"]["sub_group_size"] = case.sub_group_size
    if case.bf16:
        config["bf16"] = {"enabled": True}
    if case.grad_accum_fp32:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if case.groups == "lr":
        del config["scheduler"]
    return config


def build(case: Case, world: int, rank: int = 0) -> tuple[Any, nn.Module]:
    """A fresh (engine, model) for ``case`` on ``rank`` of ``world`` (the model seeded, as after a restart)."""
    if case.zero_init:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=ds_config(case, world)):
            model = make_model(case, rank)
    else:
        model = make_model(case, rank)
    params = param_groups(model, case.groups) if case.groups else model.parameters()
    engine, _, _, _ = ds_spngd.initialize(model=model, model_parameters=params, config=ds_config(case, world))
    return engine, model


def spngd_of(engine: Any) -> SPNGD:
    """The SP-NGD optimizer behind ``engine`` (public :func:`ds_spngd.get_spngd`)."""
    spngd = ds_spngd.get_spngd(engine)
    assert spngd is not None, "no SP-NGD optimizer behind the engine"
    return spngd
