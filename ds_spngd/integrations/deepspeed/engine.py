"""``ds_spngd.initialize``: deepspeed.initialize with SP-NGD selectable from the JSON.

DeepSpeed has no registry for custom optimizer names, so a user's script changes one call::

    engine, optimizer, loader, scheduler = ds_spngd.initialize(args=args, model=model,
                                                               model_parameters=model.parameters())

and writes ``"optimizer": {"type": "SPNGD", "params": {...}}`` in the DeepSpeed JSON. Any other optimizer type is
passed to deepspeed.initialize untouched. For SPNGD the wrapper

* loads the config (path, dict, or ``args.deepspeed_config``) and validates ``optimizer.params`` before anything is
  built (:class:`ds_spngd.config.SPNGDConfigError` names the key);
* sets ``gradient_clipping`` to 0 when the JSON does not set it: DeepSpeed 0.19.8 defaults to clipping at norm 1.0,
  which would silently rescale the gradient before preconditioning;
* refuses what is not supported with a message saying why: ZeRO stage 3, and fp16 at stage 0 (DeepSpeed 0.19.8's
  stage-0 fp16 wrapper under-steps non-scale-invariant optimizers); ZeRO 1/2 (fp32, bf16, fp16) are supported and
  ``zero_allow_untested_optimizer`` is set for them;
* builds :class:`ds_spngd.SPNGD` on the raw model (its hooks must be registered before DeepSpeed wraps the model) and
  hands it to deepspeed.initialize as a client optimizer, so DeepSpeed's JSON ``scheduler``, monitors, bf16 and
  checkpoints work as usual;
* then glues SP-NGD to the engine (:func:`attach`): the data-parallel group and ZeRO partitions, the fp16 loss scale,
  overflow-skipped steps (statistics dropped, nothing else touched), steps SP-NGD skipped itself (reported to
  DeepSpeed as overflow, so it counts them and holds the LR scheduler), per-rank SP-NGD checkpoint shards next to
  DeepSpeed's files, the start-up memory report, and per-step timings/bytes/memory written to DeepSpeed's monitor.

For every optimizer type, a top-level ``"gradient_noise_scale": {"enabled": true, "ema": 0.95}`` section measures
the gradient noise scale B_simple at each step (:mod:`ds_spngd.integrations.deepspeed.noise_scale`, ZeRO stage 0, two or more ranks).

``"type": "LARS"`` / ``"Lamb"`` select the layer-wise first-order baselines (:mod:`ds_spngd.integrations.deepspeed.first_order`): unless
DeepSpeed's own FusedLamb runs them (Lamb on CUDA), the wrapper validates their params, builds the pytorch-optimizer
class on the parameters and passes it to deepspeed.initialize as a client optimizer (ZeRO stage 0; fp32 or bf16).
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import deepspeed
import torch
from deepspeed.utils import lazy_init_hp_params_optimizer_state, log_dist

from ds_spngd.checkpoint import SHARD_PATTERN
from ds_spngd.comm.collectives import rank
from ds_spngd.config import SPNGDConfigError, parse_spngd_params
from ds_spngd.integrations.deepspeed.ds_config import fp16_enabled, zero_stage
from ds_spngd.integrations.deepspeed.first_order import initialize_first_order, is_first_order_config
from ds_spngd.integrations.deepspeed.zero import PartitionedGradients, is_partitioned
from ds_spngd.memory import CATEGORIES, format_memory, plans_per_rank
from ds_spngd.integrations.deepspeed.noise_scale import attach_noise_scale, parse_noise_scale
from ds_spngd.optimizer import SPNGD

__all__ = ["initialize", "load_ds_config", "is_spngd_config", "get_spngd"]

logger = logging.getLogger("ds_spngd")


def load_ds_config(config: str | os.PathLike[str] | dict[str, Any]) -> dict[str, Any]:
    """Return a deep copy of a DeepSpeed config given as a dict or a JSON file path.

    Raises:
        FileNotFoundError: the path does not exist.
        SPNGDConfigError: the file is not valid JSON (message gives file, line and column) or not a JSON object.
    """
    if isinstance(config, dict):
        return copy.deepcopy(config)
    path = os.fspath(config)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DeepSpeed config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            loaded = json.load(f)
        except json.JSONDecodeError as err:
            raise SPNGDConfigError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None
    if not isinstance(loaded, dict):
        raise SPNGDConfigError(f"{path}: a DeepSpeed config must be a JSON object, got {type(loaded).__name__}")
    return loaded


def is_spngd_config(ds_config: dict[str, Any]) -> bool:
    """True when the config's optimizer section selects SP-NGD (type "SPNGD", case-insensitive)."""
    section = ds_config.get("optimizer")
    return isinstance(section, dict) and str(section.get("type", "")).lower() == "spngd"


def _check_supported(ds_config: dict[str, Any]) -> None:
    stage = zero_stage(ds_config)
    if stage not in (0, 1, 2):
        raise SPNGDConfigError(
            f"zero_optimization.stage={stage} is not supported by SP-NGD: stage 3 partitions the parameters "
            "themselves, so no rank holds a layer's weight to precondition. Use stage 1 or 2 (or 0)."
        )
    if fp16_enabled(ds_config) and stage == 0:
        raise SPNGDConfigError(
            "fp16.enabled=true with ZeRO stage 0 is not supported: DeepSpeed 0.19.8's stage-0 fp16 wrapper divides "
            "the update by the loss scale without scaling the loss, which under-steps SP-NGD. Use fp16 with ZeRO "
            "stage 1 or 2, or bf16 / fp32 at any stage."
        )
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        v = ds_config.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise SPNGDConfigError(f"{key} must be a positive integer, got {v!r}")


def get_spngd(engine_or_optimizer: Any) -> SPNGD | None:
    """The SP-NGD optimizer behind a DeepSpeed engine or optimizer wrapper, or None."""
    obj = engine_or_optimizer
    for attr in ("basic_optimizer", "optimizer"):
        if isinstance(obj, SPNGD):
            return obj
        obj = getattr(obj, attr, None)
    return obj if isinstance(obj, SPNGD) else None


def initialize(
    args: Any = None,
    model: torch.nn.Module | None = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    distributed_port: int = 29500,
    mpu: Any = None,
    dist_init_required: bool | None = None,
    collate_fn: Any = None,
    config: str | dict[str, Any] | None = None,
    mesh_param: Any = None,
    config_params: str | dict[str, Any] | None = None,
) -> tuple[Any, Any, Any, Any]:
    """Drop-in replacement for ``deepspeed.initialize`` that understands ``"optimizer": {"type": "SPNGD"}`` (and
    ``"LARS"`` / ``"Lamb"``, :func:`ds_spngd.integrations.deepspeed.first_order.initialize_first_order`).

    Arguments and return value are deepspeed.initialize's: (engine, optimizer, training_dataloader, lr_scheduler).
    The returned optimizer is DeepSpeed's (a bf16 wrapper around SP-NGD, or SP-NGD itself); :func:`get_spngd`
    finds the SP-NGD object.

    Raises:
        SPNGDConfigError: invalid or unsupported SP-NGD configuration (before anything is built); its subclass
            :class:`ds_spngd.integrations.deepspeed.first_order.OptimizerConfigError` for LARS / Lamb.
        ValueError: SPNGD selected but an optimizer object was also passed, or no model.
    """
    passthrough = dict(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters, training_data=training_data,
        lr_scheduler=lr_scheduler, distributed_port=distributed_port, mpu=mpu, dist_init_required=dist_init_required,
        collate_fn=collate_fn, config=config, mesh_param=mesh_param, config_params=config_params,
    )
    source = config if config is not None else config_params
    args_config = getattr(args, "deepspeed_config", None) if args is not None else None
    if source is None:
        source = args_config
    if source is None:
        return deepspeed.initialize(**passthrough)
    ds_config = load_ds_config(source)
    noise_cfg = parse_noise_scale(ds_config)  # top-level "gradient_noise_scale" (DeepSpeed ignores the key)
    if is_first_order_config(ds_config):  # LARS / Lamb: ds_spngd.integrations.deepspeed.first_order
        ds_args = _without_config_path(args) if args_config is not None else args
        built = initialize_first_order(ds_config, {**passthrough, "args": ds_args, "config_params": None})
        attach_noise_scale(built[0], noise_cfg)
        return built
    if not is_spngd_config(ds_config):
        built = deepspeed.initialize(**passthrough)
        attach_noise_scale(built[0], noise_cfg)
        return built
    if optimizer is not None:
        raise ValueError("the config selects optimizer type SPNGD, but an optimizer object was passed as well")
    if model is None:
        raise ValueError("SP-NGD needs the model (its layers get curvature hooks): pass model=...")
    _check_supported(ds_config)
    unknown = sorted(set(ds_config["optimizer"]) - {"type", "params"})
    unknown_lines = [f"  optimizer.{k}: unknown key (the optimizer section takes 'type' and 'params')" for k in unknown]
    try:
        spngd_cfg = parse_spngd_params(ds_config["optimizer"].get("params"))
    except SPNGDConfigError as err:
        raise SPNGDConfigError("\n".join([str(err), *unknown_lines])) from None
    if unknown_lines:
        raise SPNGDConfigError("invalid SP-NGD config:\n" + "\n".join(unknown_lines))
    if spngd_cfg.precondition_mode == "reduce_scatter":
        if zero_stage(ds_config) != 0:
            raise SPNGDConfigError(
                f'optimizer.params.precondition_mode="reduce_scatter" needs zero_optimization.stage=0 (now '
                f"{zero_stage(ds_config)}): it replaces DeepSpeed's gradient all-reduce, which ZeRO 1/2 turn into "
                'their own reduce-scatter; use "comm_opt" or "mem_opt" with ZeRO 1/2')
        if noise_cfg.enabled:
            raise SPNGDConfigError(
                'gradient_noise_scale.enabled=true cannot be used with precondition_mode="reduce_scatter": the noise '
                "scale reads the gradient norms around DeepSpeed's all-reduce, which this mode turns off")
    if "gradient_clipping" not in ds_config:
        ds_config["gradient_clipping"] = 0.0
        logger.info("SP-NGD: gradient_clipping not set; using 0 (DeepSpeed's default 1.0 would rescale gradients)")
    elif float(ds_config["gradient_clipping"]) > 0:
        logger.warning("SP-NGD: gradient_clipping=%s clips the raw gradient before preconditioning; kl_clip is the "
                       "natural-gradient analogue", ds_config["gradient_clipping"])
    del ds_config["optimizer"]
    if zero_stage(ds_config) in (1, 2):
        ds_config.setdefault("zero_allow_untested_optimizer", True)

    params = list(model.parameters() if model_parameters is None else model_parameters)
    spngd = SPNGD(params, model=model, config=spngd_cfg)
    ds_args = _without_config_path(args) if args_config is not None else args
    spngd.suspended = True  # DeepSpeed's precision wrappers call step() once while being built
    try:
        engine, ds_opt, loader, scheduler = deepspeed.initialize(
            args=ds_args, model=model, optimizer=spngd, model_parameters=params, training_data=training_data,
            lr_scheduler=lr_scheduler, distributed_port=distributed_port, mpu=mpu,
            dist_init_required=dist_init_required, collate_fn=collate_fn, config=ds_config, mesh_param=mesh_param,
        )
    finally:
        spngd.suspended = False
    attach(engine, spngd, fp16=fp16_enabled(ds_config))
    attach_noise_scale(engine, noise_cfg)
    log_dist(spngd.report(), ranks=[0])  # DeepSpeed's logger prints INFO; the library logger is left to the user
    log_dist(memory_report(spngd), ranks=[0])
    return engine, ds_opt, loader, scheduler


def _without_config_path(args: Any) -> Any:
    """A copy of ``args`` with ``deepspeed_config = None`` (DeepSpeed refuses a config path and a dict together)."""
    ds_args = argparse.Namespace(**vars(args)) if isinstance(args, argparse.Namespace) else copy.copy(args)
    ds_args.deepspeed_config = None
    return ds_args


def memory_report(spngd: SPNGD) -> str:
    """SP-NGD's planned memory per rank: the maximum over ranks of :meth:`SPNGD.memory_plan` per category, and the
    total of the rank that needs most (computed locally: the plan depends on shapes and owners only)."""
    plans = plans_per_rank(spngd)
    worst = max(plans, key=lambda p: p["total"])
    per_cat = {k: max(p[k] for p in plans) for k in (*CATEGORIES, "total")}
    return (format_memory(per_cat, "SP-NGD memory per rank, max over ranks per category") + "\n"
            + format_memory(worst, f"rank {plans.index(worst)} (largest total)"))


def attach(engine: Any, spngd: SPNGD, fp16: bool = False) -> None:
    """Glue an SP-NGD optimizer to a DeepSpeed engine built with it (done by :func:`initialize`).

    * data-parallel group, ZeRO partitions and gradient accumulation; under ZeRO 1/2 the write-back of parameter
      groups DeepSpeed stepped before the last one (:mod:`ds_spngd.gradients`) and the re-link of DeepSpeed's
      optimizer-state fragments to SP-NGD's momentum (:func:`_glue_zero_partitions`);
    * fp16: the hooks divide by the engine's current loss scale;
    * ``engine.step``: a step DeepSpeed skipped (fp16 overflow) drops this step's factor statistics and leaves
      factors, preconditioners, momentum and counters as they were; a skipped step without fp16 (NaN/Inf gradients
      under ZeRO) raises FloatingPointError; timings and bytes go to ``engine.monitor`` under ``SPNGD/...``;
    * ``engine.forward`` / ``engine.backward``: timed (``SPNGD/forward_s``, ``SPNGD/backward_s`` per step);
    * ``precondition_mode: "reduce_scatter"`` (ZeRO 0, several ranks): DeepSpeed's gradient all-reduce is turned off
      (``engine.enable_backward_allreduce``) and each backward tells SP-NGD's gradient reducer whether it ends the
      accumulation cycle (:mod:`ds_spngd.comm.grad_reduction`);
    * ``engine.save_checkpoint`` / ``load_checkpoint``: every rank also writes / reads its SP-NGD shard
      (:data:`SHARD_PATTERN` in the tag directory), so state owned by ranks other than 0 survives at every stage.
    """
    spngd.set_gradient_accumulation_steps(engine.gradient_accumulation_steps())
    partitioned = is_partitioned(spngd.model_parameters)  # every parameter: with no Fisher block at all, too
    spngd.setup_distributed(getattr(engine, "data_parallel_group", None),
                            PartitionedGradients(spngd, spngd.blocks) if partitioned else None)
    relink = _glue_zero_partitions(getattr(engine, "optimizer", None), spngd)
    stale_links = [relink is not None]
    if fp16:
        spngd.set_loss_scale_fn(lambda: float(engine.optimizer.loss_scale))
    times = {"forward_s": 0.0, "backward_s": 0.0}
    spngd.engine_times = times

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times[name] += time.perf_counter() - t0
        return run

    if spngd.grad_reducer is not None:  # precondition_mode "reduce_scatter": SP-NGD reduces the gradients itself
        engine.enable_backward_allreduce = False
        reducer, plain_backward = spngd.grad_reducer, engine.backward

        def backward(*a: Any, **k: Any) -> Any:  # the hooks launch buckets only in the boundary backward
            reducer.arm(engine.is_gradient_accumulation_boundary())
            return plain_backward(*a, **k)

        engine.backward = backward
    engine.forward = timed("forward_s", engine.forward)
    engine.backward = timed("backward_s", engine.backward)
    _report_skips_as_overflow(engine, spngd)
    orig_step = engine.step

    def step(*a: Any, **k: Any) -> Any:
        boundary = engine.is_gradient_accumulation_boundary()
        before = (spngd.steps, spngd.skipped_steps)
        out = orig_step(*a, **k)
        if not boundary:
            return out
        if relink is not None and stale_links[0] and spngd.steps != before[0]:
            relink()
            stale_links[0] = False
        if (spngd.steps, spngd.skipped_steps) == before:  # DeepSpeed skipped the optimizer step itself
            spngd.discard_step()
            if not fp16:  # outside fp16 loss scaling, DeepSpeed skips for NaN/Inf gradient norms (ZeRO, bf16)
                reason = (f"DeepSpeed skipped optimizer step {engine.global_steps}: the gradient norm is NaN/Inf; "
                          "no parameter was updated")
                if spngd.cfg.nonfinite == "raise":
                    raise FloatingPointError(reason)
                spngd.note_skipped(reason)
        _write_events(engine, spngd, times)
        times["forward_s"] = times["backward_s"] = 0.0
        return out

    engine.step = step
    orig_save, orig_load = engine.save_checkpoint, engine.load_checkpoint

    def save_checkpoint(save_dir: str, tag: Any = None, *a: Any, **k: Any) -> Any:
        out = orig_save(save_dir, tag, *a, **k)
        tag_dir = os.path.join(save_dir, str(tag if tag is not None else f"global_step{engine.global_steps}"))
        os.makedirs(tag_dir, exist_ok=True)
        torch.save(spngd.spngd_state(), os.path.join(tag_dir, SHARD_PATTERN.format(rank=rank())))
        _barrier()
        return out

    def load_checkpoint(load_dir: str, tag: Any = None, *a: Any, **k: Any) -> Any:
        out = orig_load(load_dir, tag, *a, **k)
        path = out[0] if isinstance(out, tuple) else None
        if path is None or not k.get("load_optimizer_states", True):
            return out
        tag_dir = os.path.dirname(path) if os.path.isfile(path) else path
        files = sorted(glob.glob(os.path.join(tag_dir, "spngd_rank*.pt")))
        if not files:
            raise FileNotFoundError(f"checkpoint {tag_dir} has no SP-NGD shards (spngd_rank*.pt); it was not saved "
                                    "through ds_spngd.initialize's engine")
        # read onto the CPU (the shards may come from other devices); load_sharded_state moves every tensor to its
        # block's device
        spngd.load_sharded_state([torch.load(f, map_location="cpu", weights_only=False) for f in files])
        stale_links[0] = relink is not None
        return out

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint


def _glue_zero_partitions(wrapper: Any, spngd: SPNGD) -> Callable[[], None] | None:
    """ZeRO 1/2 (DeepSpeedZeroOptimizer) glue: the write-back SP-NGD needs when DeepSpeed steps several parameter
    groups one at a time (:mod:`ds_spngd.gradients`), and the re-link of DeepSpeed's optimizer-state fragments.

    DeepSpeed links each parameter's ``_hp_mapping.optim_fragment`` (what ``deepspeed.utils.
    safe_get_full_optimizer_state`` reads) once, right after the first group's ``step()`` call (stage_1_and_2.py
    l. 2987, 852–857) and not again after loading a checkpoint; SP-NGD creates its momentum buffers on the last
    group's call (or not at all on a skipped first step). The returned function links them again; ``attach`` calls
    it after the first applied step, and again after the first applied step that follows each ``load_checkpoint``.
    None for other wrappers (BF16_Optimizer steps every group in one call and links after it).
    """
    needed = ("single_partition_of_fp32_groups", "parallel_partitioned_bit16_groups", "real_dp_process_group",
              "bit16_groups")
    if not isinstance(spngd.grads, PartitionedGradients) or not all(hasattr(wrapper, a) for a in needed):
        return None

    def write_back(i: int) -> None:  # DeepSpeed's own copy after group i's step (stage_1_and_2.py l. 3143–3145)
        part = rank(wrapper.real_dp_process_group[i])
        wrapper.parallel_partitioned_bit16_groups[i][part].data.copy_(wrapper.single_partition_of_fp32_groups[i].data)

    spngd.grads.write_back = write_back

    def relink() -> None:
        for lp_params, flat in zip(wrapper.bit16_groups, wrapper.single_partition_of_fp32_groups, strict=True):
            lazy_init_hp_params_optimizer_state(lp_params, flat, spngd.state)

    return relink


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _report_skips_as_overflow(engine: Any, spngd: SPNGD) -> None:
    """A step SP-NGD skipped (``nonfinite: "skip"``) must look to the engine like an fp16 overflow skip: it counts
    ``skipped_steps`` and holds the LR scheduler when ``engine.optimizer.overflow`` is true after the step. At stage
    0 fp32 the engine's optimizer is SP-NGD itself (its ``overflow``); DeepSpeed's wrappers (ZeRO, bf16/fp16) reset
    their own ``overflow`` at the start of their step, so it is set after their step returns."""
    wrapper = getattr(engine, "optimizer", None)
    if wrapper is spngd or wrapper is None:
        return
    inner = wrapper.step

    def wrapped_step(*a: Any, **k: Any) -> Any:
        spngd.overflow = False
        out = inner(*a, **k)
        if spngd.overflow:
            wrapper.overflow = True
        return out

    wrapper.step = wrapped_step


def _write_events(engine: Any, spngd: SPNGD, times: dict[str, float]) -> None:
    """Timings, bytes, skip counts and this rank's memory (``SPNGD/memory_<category>_bytes``) to the monitor."""
    monitor = getattr(engine, "monitor", None)
    if monitor is None or not getattr(monitor, "enabled", False):
        return
    values = {**times, **spngd.last_stats, "skipped_steps": float(spngd.skipped_steps)}
    values.update({f"memory_{k}_bytes": float(v) for k, v in spngd.memory_usage().items()})
    monitor.write_events([(f"SPNGD/{k}", float(v), engine.global_samples) for k, v in sorted(values.items())])
