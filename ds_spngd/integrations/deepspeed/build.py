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
* refuses what is not supported with a message saying why: fp16 at stage 0 (DeepSpeed 0.19.8's
  stage-0 fp16 wrapper under-steps non-scale-invariant optimizers); ZeRO 1/2/3 (fp32, bf16, fp16) are supported and
  ``zero_allow_untested_optimizer`` is set for them;
* builds :class:`ds_spngd.SPNGD` on the raw model (its hooks must be registered before DeepSpeed wraps the model) and
  hands it to deepspeed.initialize as a client optimizer (DeepSpeed's seam for custom optimizers), so DeepSpeed's
  JSON ``scheduler``, monitors, bf16 and checkpoints work as usual; its step is a no-op while DeepSpeed builds its
  wrappers (:func:`ds_spngd.integrations.deepspeed.construction.step_disabled`);
* then glues SP-NGD to the engine (:func:`adopt`: :func:`ds_spngd.integrations.deepspeed.engine.attach`, the noise
  scale) and logs SP-NGD's report and planned memory per rank.

An SP-NGD built by the caller can be passed as ``optimizer=`` instead (the JSON then has no SPNGD section): the same
config preparation and glue apply. Frameworks that call deepspeed.initialize themselves (the Hugging Face Trainer,
Accelerate: :mod:`ds_spngd.integrations.transformers`, :mod:`ds_spngd.integrations.accelerate`) use the two halves
directly: :func:`prepare_client_config` on the config dict before DeepSpeed reads it, :func:`adopt` on the engine
after.

``deepspeed.initialize = ds_spngd.initialize`` (a script that cannot change its calls) works: DeepSpeed's own
``initialize`` is captured when this module is imported, and a call that reaches ``ds_spngd.initialize`` again from
inside itself (through the replaced attribute) goes straight to it.

For every optimizer type, a top-level ``"gradient_noise_scale": {"enabled": true, "ema": 0.95}`` section measures
the gradient noise scale B_simple at each step (:mod:`.noise_scale`, ZeRO stage 0, two or more ranks).

``"type": "LARS"`` / ``"Lamb"`` select the layer-wise first-order baselines (:mod:`.first_order`): unless DeepSpeed's
own FusedLamb runs them (Lamb on CUDA), the wrapper validates their params, builds the pytorch-optimizer class on the
parameters and passes it to deepspeed.initialize as a client optimizer (ZeRO stage 0; fp32 or bf16).

``"type": "DecentLaM"`` / ``"DmSGD"`` select decentralized momentum SGD on a sparse topology (:mod:`.decentralized`,
glue in :mod:`.decentralized_engine`: DeepSpeed's gradient all-reduce off, per-rank checkpoints; ZeRO stage 0).

For every optimizer type, ``"scheduler": {"type": "AdaptiveWarmup", "params": {...}}`` selects
:class:`ds_spngd.schedules.AdaptiveWarmup` (AutoWU, arXiv:2107.05855): :mod:`.schedulers` takes the section out,
passes the scheduler as ``lr_scheduler=`` and feeds it the step's loss averaged over the data-parallel ranks.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import deepspeed
import torch
from deepspeed.utils import log_dist

from ds_spngd.config import SPNGDConfig, SPNGDConfigError, parse_spngd_params
from ds_spngd.integrations.deepspeed.construction import step_disabled
from ds_spngd.integrations.deepspeed.decentralized_engine import initialize_decentralized, is_decentralized_config
from ds_spngd.integrations.deepspeed.ds_config import fp16_enabled, optimizer_type, without_config_path, zero_stage
from ds_spngd.integrations.deepspeed.engine import attach
from ds_spngd.integrations.deepspeed.first_order import initialize_first_order, is_first_order_config
from ds_spngd.integrations.deepspeed.noise_scale import NoiseScaleConfig, attach_noise_scale, parse_noise_scale
from ds_spngd.integrations.deepspeed.schedulers import initialize_with_scheduler
from ds_spngd.memory import CATEGORIES, format_memory, plans_per_rank
from ds_spngd.optimizer import SPNGD
from ds_spngd.placement import PLACEMENTS

__all__ = ["initialize", "load_ds_config", "is_spngd_config", "get_spngd", "memory_report", "spngd_config",
           "check_client_config", "prepare_client_config", "adopt", "is_adopted", "deepspeed_initialize"]

logger = logging.getLogger("ds_spngd")

ORIGINAL_ATTR = "ds_spngd_original"  # on ds_spngd.initialize: DeepSpeed's own initialize (kept by functools.wraps)
# DeepSpeed's own initialize, captured once (unwrapped when the attribute already is ours, e.g. on a module reload)
_DEEPSPEED_INITIALIZE: Callable[..., Any] = getattr(deepspeed.initialize, ORIGINAL_ATTR, deepspeed.initialize)
_ADOPTED: weakref.WeakSet[SPNGD] = weakref.WeakSet()  # SP-NGD objects glued to an engine by adopt()
_INSIDE = threading.local()  # .depth: calls of initialize() running on this thread


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
    return optimizer_type(ds_config) == "spngd"


def get_spngd(engine_or_optimizer: Any) -> SPNGD | None:
    """The SP-NGD optimizer behind a DeepSpeed engine or optimizer wrapper, or None."""
    obj = engine_or_optimizer
    for attr in ("basic_optimizer", "optimizer"):  # PATCHES: engine.basic_optimizer
        if isinstance(obj, SPNGD):
            return obj
        obj = getattr(obj, attr, None)
    return obj if isinstance(obj, SPNGD) else None


def memory_report(spngd: SPNGD) -> str:
    """SP-NGD's planned memory per rank: the maximum over ranks of :meth:`SPNGD.memory_plan` per category, and the
    total of the rank that needs most (computed locally: the plan depends on shapes and owners only)."""
    plans = plans_per_rank(spngd)
    worst = max(plans, key=lambda p: p["total"])
    per_cat = {k: max(p[k] for p in plans) for k in (*CATEGORIES, "total")}
    return (format_memory(per_cat, "SP-NGD memory per rank, max over ranks per category") + "\n"
            + format_memory(worst, f"rank {plans.index(worst)} (largest total)"))


def deepspeed_initialize() -> Callable[..., Any]:
    """The ``deepspeed.initialize`` to call: the current attribute, unless it is (a wrapper of) ``ds_spngd.initialize``
    or this call runs inside ``ds_spngd.initialize`` already; then DeepSpeed's own, captured at import."""
    current = deepspeed.initialize
    if getattr(_INSIDE, "depth", 0) > 1 or getattr(current, ORIGINAL_ATTR, None) is _DEEPSPEED_INITIALIZE:
        return _DEEPSPEED_INITIALIZE
    return current


@contextlib.contextmanager
def _entered() -> Iterator[int]:
    """Count this thread's running :func:`initialize` calls; yields the depth (1 for the outermost)."""
    _INSIDE.depth = getattr(_INSIDE, "depth", 0) + 1
    try:
        yield _INSIDE.depth
    finally:
        _INSIDE.depth -= 1


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
    ``"LARS"`` / ``"Lamb"``, :func:`ds_spngd.integrations.deepspeed.first_order.initialize_first_order`), and glues
    an :class:`ds_spngd.SPNGD` passed as ``optimizer=`` to the engine.

    Arguments and return value are deepspeed.initialize's: (engine, optimizer, training_dataloader, lr_scheduler).
    The returned optimizer is DeepSpeed's (a bf16 wrapper around SP-NGD, or SP-NGD itself); :func:`get_spngd`
    finds the SP-NGD object. With a client SP-NGD, an ``optimizer`` section of another type in the JSON is dropped
    with a warning (DeepSpeed would ignore it silently).

    Raises:
        SPNGDConfigError: invalid or unsupported SP-NGD configuration (before anything is built); its subclass
            :class:`ds_spngd.integrations.deepspeed.first_order.OptimizerConfigError` for LARS / Lamb.
        ValueError: SPNGD selected but an optimizer object was also passed; no model; a client SP-NGD without a
            readable config (``config``, ``config_params`` or ``args.deepspeed_config``).
    """
    passthrough = dict(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters, training_data=training_data,
        lr_scheduler=lr_scheduler, distributed_port=distributed_port, mpu=mpu, dist_init_required=dist_init_required,
        collate_fn=collate_fn, config=config, mesh_param=mesh_param, config_params=config_params,
    )
    with _entered() as depth:
        if depth > 1:  # reached again through deepspeed.initialize = ds_spngd.initialize: DeepSpeed's own
            return _DEEPSPEED_INITIALIZE(**passthrough)
        return initialize_with_scheduler(_initialize, passthrough)  # "scheduler": {"type": "AdaptiveWarmup"}


setattr(initialize, ORIGINAL_ATTR, _DEEPSPEED_INITIALIZE)  # noqa: B010 - marks ours (mypy rejects function attrs)


def _initialize(passthrough: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """The body of :func:`initialize` (``passthrough``: its arguments by name)."""
    args, optimizer = passthrough["args"], passthrough["optimizer"]
    source = passthrough["config"] if passthrough["config"] is not None else passthrough["config_params"]
    args_config = getattr(args, "deepspeed_config", None) if args is not None else None
    if source is None:
        source = args_config
    if source is None:
        if isinstance(optimizer, SPNGD):
            raise ValueError("an SP-NGD optimizer object needs the DeepSpeed config as config=, config_params= or "
                             "args.deepspeed_config: ds_spngd prepares it before DeepSpeed reads it")
        return deepspeed_initialize()(**passthrough)
    ds_config = load_ds_config(source)
    noise_cfg = parse_noise_scale(ds_config)  # top-level "gradient_noise_scale" (DeepSpeed ignores the key)
    if not (isinstance(optimizer, SPNGD) or is_spngd_config(ds_config) or is_first_order_config(ds_config)
            or is_decentralized_config(ds_config)):
        built = deepspeed_initialize()(**passthrough)
    else:  # the config is edited: args must not point DeepSpeed at the file
        ds_args = without_config_path(args) if args_config is not None else args
        ds_kwargs = {**passthrough, "args": ds_args, "config_params": None}
        if isinstance(optimizer, SPNGD) or is_spngd_config(ds_config):
            return _initialize_spngd(ds_config, noise_cfg, ds_kwargs)
        elif is_decentralized_config(ds_config):  # DecentLaM / DmSGD
            built = initialize_decentralized(ds_config, ds_kwargs)
        else:
            built = initialize_first_order(ds_config, ds_kwargs)  # LARS / Lamb
    attach_noise_scale(built[0], noise_cfg)
    return built


def _initialize_spngd(ds_config: dict[str, Any], noise_cfg: NoiseScaleConfig,
                      ds_kwargs: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """The SPNGD route of :func:`initialize`: SP-NGD from the JSON section or the caller's object (``ds_kwargs``:
    deepspeed.initialize's, ``args`` without a config path)."""
    model, client = ds_kwargs["model"], ds_kwargs["optimizer"]
    if is_spngd_config(ds_config) and client is not None:
        raise ValueError("the config selects optimizer type SPNGD, but an optimizer object was passed as well")
    if isinstance(client, SPNGD):
        if "optimizer" in ds_config:
            section = ds_config.pop("optimizer")
            kind = section.get("type") if isinstance(section, dict) else section
            logger.warning("SP-NGD: the DeepSpeed config's optimizer section (type %r) is ignored: an SP-NGD object "
                           "was passed as optimizer=", kind)
        prepare_client_config(ds_config, client.cfg, noise_cfg)
        spngd, params = client, ds_kwargs["model_parameters"]
    else:
        if model is None:
            raise ValueError("SP-NGD needs the model (its layers get curvature hooks): pass model=...")
        spngd_cfg = spngd_config(ds_config)
        prepare_client_config(ds_config, spngd_cfg, noise_cfg)
        del ds_config["optimizer"]
        given = ds_kwargs["model_parameters"]
        params = list(model.parameters() if given is None else given)
        spngd = SPNGD(params, model=model, config=spngd_cfg)
    with step_disabled(spngd):  # DeepSpeed's precision wrappers call step() once while being built
        engine, ds_opt, loader, scheduler = deepspeed_initialize()(
            **{**ds_kwargs, "optimizer": spngd, "model_parameters": params, "config": ds_config})
    adopt(engine, spngd, ds_config)
    return engine, ds_opt, loader, scheduler


def adopt(engine: Any, spngd: SPNGD, ds_config: dict[str, Any]) -> bool:
    """Glue an SP-NGD optimizer to the DeepSpeed engine that was just built with it as its client optimizer: the
    engine seam (:func:`ds_spngd.integrations.deepspeed.engine.attach`: data-parallel group, ZeRO partitions,
    backward / step / checkpoint wrappers), the gradient noise scale of the config's ``gradient_noise_scale``
    section, and SP-NGD's report and planned memory logged on rank 0.

    Call it right after DeepSpeed built the engine, before the first forward. A second call for the same SP-NGD does
    nothing (a framework's glue and ``deepspeed.initialize = ds_spngd.initialize`` may both reach it).

    Args:
        engine: the DeepSpeed engine.
        spngd: the SP-NGD object passed to DeepSpeed as its optimizer.
        ds_config: the config dict DeepSpeed was given (read: ``fp16.enabled``, ``gradient_noise_scale``).

    Returns:
        True when it glued, False when ``spngd`` was glued already.

    Raises:
        ValueError: the engine's optimizer wraps another SP-NGD.
        SPNGDConfigError: an invalid ``gradient_noise_scale`` section.
    """
    if spngd in _ADOPTED:
        return False
    found = get_spngd(engine)
    if found is not None and found is not spngd:
        raise ValueError("the DeepSpeed engine was built with another SP-NGD optimizer than the one to glue")
    attach(engine, spngd, fp16=fp16_enabled(ds_config))
    attach_noise_scale(engine, parse_noise_scale(ds_config))
    _ADOPTED.add(spngd)
    log_dist(spngd.report(), ranks=[0])  # DeepSpeed's logger prints INFO; the library logger is left to the user
    log_dist(memory_report(spngd), ranks=[0])
    return True


def is_adopted(spngd: SPNGD) -> bool:
    """Whether :func:`adopt` glued ``spngd`` to an engine."""
    return spngd in _ADOPTED


def _check_supported(ds_config: dict[str, Any]) -> None:
    """Refuse an unknown ZeRO stage, stage-0 fp16 and non-positive batch sizes before anything is built ("auto"
    batch sizes are left to the framework that fills them)."""
    stage = zero_stage(ds_config)
    if stage not in (0, 1, 2, 3):
        raise SPNGDConfigError(f"zero_optimization.stage={stage} is not a ZeRO stage (0, 1, 2 or 3)")
    if fp16_enabled(ds_config) and stage == 0:
        raise SPNGDConfigError(
            "fp16.enabled=true with ZeRO stage 0 is not supported: DeepSpeed 0.19.8's stage-0 fp16 wrapper divides "
            "the update by the loss scale without scaling the loss, which under-steps SP-NGD. Use fp16 with ZeRO "
            "stage 1 or 2, or bf16 / fp32 at any stage."
        )
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        v = ds_config.get(key)
        if v is not None and v != "auto" and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise SPNGDConfigError(f"{key} must be a positive integer, got {v!r}")


def spngd_config(ds_config: dict[str, Any]) -> SPNGDConfig:
    """Validate the engine settings and the SPNGD ``optimizer`` section of a DeepSpeed config; every offending key
    is named.

    Raises:
        SPNGDConfigError: unsupported engine settings (stage-0 fp16, an unknown ZeRO stage, bad batch sizes),
            unknown section keys or invalid params.
    """
    _check_supported(ds_config)
    unknown = sorted(set(ds_config["optimizer"]) - {"type", "params"})
    unknown_lines = [f"  optimizer.{k}: unknown key (the optimizer section takes 'type' and 'params')" for k in unknown]
    try:
        spngd_cfg = parse_spngd_params(ds_config["optimizer"].get("params"))
    except SPNGDConfigError as err:
        raise SPNGDConfigError("\n".join([str(err), *unknown_lines])) from None
    if unknown_lines:
        raise SPNGDConfigError("invalid SP-NGD config:\n" + "\n".join(unknown_lines))
    return spngd_cfg


def check_client_config(ds_config: dict[str, Any], spngd_cfg: SPNGDConfig,
                        noise_cfg: NoiseScaleConfig | None = None) -> None:
    """Refuse engine settings SP-NGD (with ``spngd_cfg``) cannot run under; changes nothing.

    Args:
        ds_config: the DeepSpeed config dict ("auto" values allowed where a framework fills them later).
        spngd_cfg: the SP-NGD optimizer's config (``SPNGD.cfg``).
        noise_cfg: the config's ``gradient_noise_scale`` section (None: parsed from ``ds_config``).

    Raises:
        SPNGDConfigError: stage-0 fp16, an unknown ZeRO stage, bad batch sizes, or ``precondition_mode:
            "reduce_scatter"`` with ZeRO 1-3 or with the gradient noise scale.
    """
    _check_supported(ds_config)
    noise = parse_noise_scale(ds_config) if noise_cfg is None else noise_cfg
    mode = spngd_cfg.precondition_mode
    if PLACEMENTS[mode].reduces_gradients:  # the placement replaces DeepSpeed's gradient all-reduce
        if zero_stage(ds_config) != 0:
            raise SPNGDConfigError(
                f'optimizer.params.precondition_mode="{mode}" needs zero_optimization.stage=0 (now '
                f"{zero_stage(ds_config)}): it replaces DeepSpeed's gradient all-reduce, which ZeRO 1-3 turn into "
                'their own reduce-scatter; use "comm_opt" or "mem_opt" with ZeRO 1-3')
        if noise.enabled:
            raise SPNGDConfigError(
                f'gradient_noise_scale.enabled=true cannot be used with precondition_mode="{mode}": the noise '
                "scale reads the gradient norms around DeepSpeed's all-reduce, which this mode turns off")


def prepare_client_config(ds_config: dict[str, Any], spngd_cfg: SPNGDConfig,
                          noise_cfg: NoiseScaleConfig | None = None, clipping_source: str = "") -> None:
    """Edit a DeepSpeed config dict in place so DeepSpeed can run SP-NGD as its client optimizer; call it before
    DeepSpeed reads the dict.

    Checks :func:`check_client_config`; sets ``gradient_clipping`` to 0 when absent (DeepSpeed 0.19.8's default 1.0
    would rescale the gradient before preconditioning; logged at INFO) and warns when it is positive or ``"auto"``
    (a framework fills it: Accelerate with 1.0); sets ``zero_allow_untested_optimizer`` under ZeRO 1-3. The
    ``optimizer`` section is not touched (the caller removes an SPNGD section).

    Args:
        ds_config: the DeepSpeed config dict (edited).
        spngd_cfg: the SP-NGD optimizer's config (``SPNGD.cfg``).
        noise_cfg: the ``gradient_noise_scale`` section (None: parsed from ``ds_config``).
        clipping_source: appended to the clipping warning (where the value came from, how to turn it off).

    Raises:
        SPNGDConfigError: as :func:`check_client_config`.
    """
    check_client_config(ds_config, spngd_cfg, noise_cfg)
    clip = ds_config.get("gradient_clipping")
    if clip is None:
        ds_config["gradient_clipping"] = 0.0
        logger.info("SP-NGD: gradient_clipping not set; using 0 (DeepSpeed's default 1.0 would rescale gradients)")
    elif clip == "auto" or float(clip) > 0:
        logger.warning("SP-NGD: gradient_clipping=%s clips the raw gradient before preconditioning; kl_clip is the "
                       "natural-gradient analogue%s", clip, clipping_source)
    if zero_stage(ds_config) in (1, 2, 3):
        ds_config.setdefault("zero_allow_untested_optimizer", True)
