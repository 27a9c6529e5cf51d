"""SP-NGD under Hugging Face Accelerate's DeepSpeed plugin.

A script written for Accelerate + DeepSpeed keeps its ``accelerator.prepare(model, optimizer, dataloader,
scheduler)`` call; it creates :class:`SPNGDAccelerator` instead of ``Accelerator`` (or calls
:func:`prepare_spngd` ``(accelerator, ...)`` instead of ``accelerator.prepare(...)``), and its DeepSpeed config says
``"optimizer": {"type": "SPNGD", "params": {"lr": "auto", "weight_decay": "auto", ...}}``. As Accelerate's docs
prescribe for an optimizer section in the config, the script passes ``accelerate.utils.DummyOptim(param_groups,
lr=..., weight_decay=...)`` (and ``DummyScheduler`` for a config ``scheduler``)::

    accelerator = SPNGDAccelerator()          # DeepSpeed plugin from `accelerate launch` / the environment
    optimizer = DummyOptim(param_groups, lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader,
                                                              DummyScheduler(optimizer, total_num_steps=steps))

An :class:`ds_spngd.SPNGD` built by the script (``SPNGD(param_groups, model=model, config={...})``, no SPNGD section
in the config) works the same way.

What :func:`prepare_spngd` does when the objects include an optimizer and Accelerate runs DeepSpeed:

* a ``DummyOptim`` with an SPNGD config section: takes the section out of the plugin's config (Accelerate refuses a
  config optimizer section beside a real optimizer, and DeepSpeed cannot build SPNGD), fills ``"auto"`` ``lr`` /
  ``weight_decay`` from the ``DummyOptim`` (as Accelerate fills DeepSpeed's own sections), validates it and builds
  SP-NGD on the model of the same call with the ``DummyOptim``'s parameters or groups; a ``DummyScheduler`` with an
  ``lr_scheduler_callable`` becomes that callable's scheduler on SP-NGD;
* prepares the plugin's config dict for a client SP-NGD
  (:func:`ds_spngd.integrations.deepspeed.build.prepare_client_config`: refusals, ``gradient_clipping`` 0 when absent
  and a warning when positive or ``"auto"`` — Accelerate fills ``"auto"`` with 1.0 —,
  ``zero_allow_untested_optimizer``);
* runs Accelerate's own ``prepare`` with SP-NGD's step disabled (DeepSpeed's wrappers step once while being built);
* glues SP-NGD to the DeepSpeed engine it returns (:func:`ds_spngd.integrations.deepspeed.build.adopt`): ZeRO
  partitions, backward/step/checkpoint wrappers (``engine.save_checkpoint`` writes ``spngd_rank*.pt`` shards).

Any other call (no optimizer, no DeepSpeed, another optimizer) is Accelerate's ``prepare`` unchanged.

Accelerate internals relied on (accelerate 1.16, ``accelerator.py``): ``Accelerator._prepare_deepspeed`` builds the
engine from ``AcceleratorState().deepspeed_plugin.deepspeed_config`` (the dict edited here, read when ``prepare`` runs)
with ``deepspeed.initialize(model=..., optimizer=<client optimizer>, config_params=...)`` and returns the
``DeepSpeedEngine`` in the model's place; it raises when the config has an ``optimizer`` section beside a real
optimizer; ``DummyOptim.params`` / ``.lr`` / ``.weight_decay`` and ``DummyScheduler.lr_scheduler_callable`` are
public attributes.

CPU (measured, 2 gloo ranks, accelerate 1.16): on a machine without an accelerator device, a rank launched with
``LOCAL_RANK`` set gets no torch.distributed backend from Accelerate's ``PartialState`` unless one is given, so it
counts 1 process (no data sharding) while DeepSpeed, initialized because of ``ACCELERATE_USE_DEEPSPEED``, averages over
2; ``cpu=True`` (or ``ACCELERATE_USE_CPU``) drops DeepSpeed for DDP. Giving the backend works:
``Accelerator(..., kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])`` (or ``PartialState(cpu=True)`` created
before the accelerator) gives 2 processes, sharded data and DistributedType.DEEPSPEED, under ``torchrun``, the
``deepspeed`` launcher and ``accelerate launch --use_deepspeed --deepspeed_config_file ... --num_processes 2``
alike. ``examples/accelerate_gpt2.py`` shows it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DummyOptim, DummyScheduler
from deepspeed.runtime.engine import DeepSpeedEngine

from ds_spngd.config import SPNGDConfigError
from ds_spngd.integrations.deepspeed.build import adopt, get_spngd, is_spngd_config, prepare_client_config, spngd_config
from ds_spngd.integrations.deepspeed.construction import step_disabled
from ds_spngd.optimizer import SPNGD

__all__ = ["SPNGDAccelerator", "prepare_spngd", "take_spngd_section", "resolve_auto", "build_spngd"]

logger = logging.getLogger("ds_spngd")

ACCELERATE_CLIPPING = (' (Accelerate fills "auto" with 1.0; write "gradient_clipping": 0 in the DeepSpeed config to '
                       "turn it off)")


def take_spngd_section(ds_config: dict[str, Any]) -> dict[str, Any] | None:
    """Remove the SPNGD ``optimizer`` section from a DeepSpeed config dict and return it; None (and the dict left as
    it is) when the config selects no SP-NGD."""
    if not is_spngd_config(ds_config):
        return None
    section: dict[str, Any] = ds_config.pop("optimizer")
    return section


def resolve_auto(section: dict[str, Any], values: dict[str, Any], source: str) -> dict[str, Any]:
    """A copy of an SPNGD ``optimizer`` section whose ``params`` equal to ``"auto"`` are filled from ``values``.

    Args:
        section: ``{"type": "SPNGD", "params": {...}}``.
        values: the values a framework fills (``{"lr": ..., "weight_decay": ...}``).
        source: where they come from, for the error message (e.g. ``"TrainingArguments"``).

    Raises:
        SPNGDConfigError: a param is ``"auto"`` that ``values`` does not fill (naming it and what can be filled).
    """
    params = dict(section.get("params") or {})
    left = []
    for key, value in params.items():
        if value == "auto":
            if key in values:
                params[key] = values[key]
            else:
                left.append(key)
    if left:
        names = ", ".join(f"optimizer.params.{k}" for k in left)
        raise SPNGDConfigError(f'invalid SP-NGD config: {names} = "auto", but {source} fills only '
                               f"{', '.join(sorted(values))}; give a value")
    return {**section, "params": params}


def build_spngd(ds_config: dict[str, Any], section: dict[str, Any], params: Any, model: torch.nn.Module) -> SPNGD:
    """Validate an SPNGD section (``"auto"`` already resolved) against the engine settings of ``ds_config`` and build
    SP-NGD on ``model`` with ``params`` (parameters or param groups).

    Raises:
        SPNGDConfigError: invalid params or unsupported engine settings (before any hook is registered).
    """
    cfg = spngd_config({**ds_config, "optimizer": section})
    return SPNGD(list(params), model=model, config=cfg)


def prepare_spngd(accelerator: Accelerator, *args: Any, device_placement: list[bool] | None = None,
                  prepare_fn: Callable[..., Any] | None = None, clipping_source: str | None = None) -> Any:
    """``accelerator.prepare(*args)`` with SP-NGD built / glued when Accelerate runs DeepSpeed (module docstring).

    Args:
        accelerator: the ``Accelerator`` (its DeepSpeed plugin's config dict is edited when SP-NGD is prepared).
        args: what ``prepare`` takes: model, optimizer (a ``DummyOptim`` for an SPNGD config section, or an
            :class:`ds_spngd.SPNGD`), data loaders, scheduler.
        device_placement: passed to ``prepare``.
        prepare_fn: the ``prepare`` to run (default ``accelerator.prepare``; a subclass passes its parent's).
        clipping_source: appended to the gradient-clipping warning (None: Accelerate's hint for ``"auto"``).

    Returns:
        What ``prepare`` returns (one object, or a tuple in the order given).

    Raises:
        ValueError: SP-NGD (or an SPNGD section with a ``DummyOptim``) without the model in the same call, an SP-NGD
            object beside an SPNGD config section, or an engine that does not wrap the SP-NGD.
        SPNGDConfigError: invalid or unsupported SP-NGD configuration.
    """
    run = accelerator.prepare if prepare_fn is None else prepare_fn
    plugin = accelerator.state.deepspeed_plugin
    objects = list(args)
    has_optimizer = any(isinstance(o, (torch.optim.Optimizer, DummyOptim)) for o in objects)
    if plugin is None or not has_optimizer:
        return run(*objects, device_placement=device_placement)
    config: dict[str, Any] = plugin.deepspeed_config
    spngd = _spngd_in(objects, config)
    if spngd is None:
        return run(*objects, device_placement=device_placement)
    if clipping_source is None:
        clipping_source = ACCELERATE_CLIPPING if config.get("gradient_clipping") == "auto" else ""
    prepare_client_config(config, spngd.cfg, clipping_source=clipping_source)
    with step_disabled(spngd):  # DeepSpeed's precision / ZeRO wrappers step once while being built
        result = run(*objects, device_placement=device_placement)
    engines = [o for o in (result if isinstance(result, tuple) else (result,)) if isinstance(o, DeepSpeedEngine)]
    if len(engines) != 1 or get_spngd(engines[0]) is not spngd:
        raise ValueError("prepare the model together with its SP-NGD optimizer in one prepare() call: DeepSpeed "
                         "builds the engine around both")
    adopt(engines[0], spngd, config)
    return result


def _spngd_in(objects: list[Any], config: dict[str, Any]) -> SPNGD | None:
    """The SP-NGD among ``objects`` (built here, replacing a ``DummyOptim``, when the config has an SPNGD section);
    None when SP-NGD is not involved. Edits ``objects`` and ``config`` (section taken out) in place."""
    client = next((o for o in objects if isinstance(o, SPNGD)), None)
    dummy_at = next((i for i, o in enumerate(objects) if isinstance(o, DummyOptim)), None)
    if client is not None and is_spngd_config(config):
        raise ValueError("the DeepSpeed config selects optimizer type SPNGD, but an SP-NGD object was passed as well")
    if client is not None or dummy_at is None or not is_spngd_config(config):
        return client
    models = [o for o in objects if isinstance(o, torch.nn.Module)]
    if len(models) != 1:
        raise ValueError("an SPNGD config section needs the model in the same prepare() call as the DummyOptim "
                         "(SP-NGD registers hooks on its layers)")
    dummy: DummyOptim = objects[dummy_at]
    section = resolve_auto(config["optimizer"], {"lr": dummy.lr, "weight_decay": dummy.weight_decay},
                           "Accelerate's DummyOptim")
    spngd = build_spngd(config, section, dummy.params, models[0])
    take_spngd_section(config)
    objects[dummy_at] = spngd
    for i, obj in enumerate(objects):
        if isinstance(obj, DummyScheduler) and obj.lr_scheduler_callable is not None:
            objects[i] = obj.lr_scheduler_callable(spngd)  # the user's scheduler, on SP-NGD
    return spngd


class SPNGDAccelerator(Accelerator):
    """``accelerate.Accelerator`` whose :meth:`prepare` builds and glues SP-NGD (:func:`prepare_spngd`); every
    other method and argument is Accelerate's."""

    def prepare(self, *args: Any, device_placement: list[bool] | None = None) -> Any:
        """Accelerate's ``prepare`` with SP-NGD built from an SPNGD config section / glued to the DeepSpeed engine.

        Raises:
            ValueError, SPNGDConfigError: as :func:`prepare_spngd`.
        """
        return prepare_spngd(self, *args, device_placement=device_placement, prepare_fn=super().prepare)
