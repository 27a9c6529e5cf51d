"""Reading the DeepSpeed JSON: the few fields the glue decides on (plain dict reads; no DeepSpeed import)."""

from __future__ import annotations

import argparse
import copy
from typing import Any

__all__ = ["zero_stage", "fp16_enabled", "optimizer_type", "without_config_path"]


def zero_stage(ds_config: dict[str, Any]) -> int:
    """The DeepSpeed JSON's ``zero_optimization.stage`` (0 when the section or the key is missing)."""
    zero = ds_config.get("zero_optimization") or {}
    return int(zero.get("stage", 0)) if isinstance(zero, dict) else 0


def fp16_enabled(ds_config: dict[str, Any]) -> bool:
    """True when the DeepSpeed JSON enables fp16 (``fp16.enabled``)."""
    fp16 = ds_config.get("fp16") or {}
    return isinstance(fp16, dict) and bool(fp16.get("enabled", False))


def without_config_path(args: Any) -> Any:
    """A copy of ``args`` with ``deepspeed_config = None`` (DeepSpeed refuses a config path and a dict together)."""
    ds_args = argparse.Namespace(**vars(args)) if isinstance(args, argparse.Namespace) else copy.copy(args)
    ds_args.deepspeed_config = None
    return ds_args


def optimizer_type(ds_config: dict[str, Any]) -> str | None:
    """The JSON's ``optimizer.type``, lower-cased (None when the section or the key is missing)."""
    section = ds_config.get("optimizer")
    return str(section.get("type", "")).lower() or None if isinstance(section, dict) else None
