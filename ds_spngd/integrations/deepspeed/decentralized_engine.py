"""DecentLaM and DmSGD (:mod:`.decentralized`) selectable from the DeepSpeed JSON through ``ds_spngd.initialize``::

    "optimizer": {"type": "DecentLaM", "params": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                                                  "topology": "ring"}}

``type`` is ``"DecentLaM"`` or ``"DmSGD"`` (case-insensitive); ``params`` are validated with pydantic
(``extra="forbid"``): an unknown key, a wrong type or an out-of-range value raises :class:`DecentralizedConfigError`
naming the key (``optimizer.params.<key>``).

What the glue does (:func:`initialize_decentralized`, called by ``ds_spngd.initialize``):

* refuses, naming the key, what it cannot run: ZeRO stage >= 1 (ZeRO reduce-scatters the gradients in its own
  hooks, so no rank keeps its local gradient; ``enable_backward_allreduce`` does not switch that off), fp16
  (DeepSpeed 0.19.8's stage-0 fp16 wrapper under-steps, see :mod:`.build`), and the ``gradient_noise_scale`` section
  (it measures around DeepSpeed's all-reduce, which is off here);
* sets ``gradient_clipping`` to 0 when the JSON does not set it (DeepSpeed's default 1.0 would clip). A positive
  value is allowed: at stage 0 fp32 DeepSpeed scales each rank's *local* gradient by ``min(1, c / mean_r ‖g_r‖)``
  (its clip averages the local norms over the data-parallel group);
* builds the optimizer on the model's parameters and passes it to ``deepspeed.initialize`` as the client optimizer
  (its step gated while DeepSpeed builds its wrappers, :mod:`.construction`), so the JSON ``scheduler`` and
  monitors work as usual; bf16 works (DeepSpeed's stage-0 bf16 wrapper hands the optimizer fp32 copies of the weights
  and rounds them back into the bf16 module after each step; no gradient reduction of its own); gradient accumulation
  works unchanged (DeepSpeed calls ``step()`` only at the boundary, with
  ``p.grad`` this rank's mean over its micro-batches);
* turns DeepSpeed's gradient all-reduce off (``engine.enable_backward_allreduce = False``, the switch
  ``precondition_mode: "reduce_scatter"`` uses; :data:`.patches.PATCHES`): each rank steps with its local gradient;
  the optimizer averages over ``engine.data_parallel_group``;
* checkpoints per rank (:func:`attach_decentralized_checkpoint`).

Replicas are not identical (that is the point of decentralized training; DeepSpeed broadcasts rank 0's weights
only once, when the engine is built). Hence:

* **evaluation** runs on the consensus model ``x̄ = (1/n) Σ_i x_i`` (the average the paper's theory is about):
  :func:`consensus_parameters` swaps each rank's parameters for the all-reduced average around an evaluation and
  restores them after, so training continues from each rank's own copy (the lab's evaluation uses it);
* **checkpoints**: at stage 0 DeepSpeed writes the module and optimizer state of data-parallel rank 0 only, and a
  load gives that copy to every rank. Every rank therefore also writes ``decentralized_rank<r>.pt`` (its own
  parameters and momentum) into the tag directory, and on load (``load_optimizer_states=True``, the default) reads
  its own file back after DeepSpeed's load, so a resume continues every replica exactly. A load whose tag lacks a
  rank's file or was saved by another world size is refused on every rank before anything is loaded
  (:class:`DecentralizedCheckpointError`); ``load_optimizer_states=False`` skips the per-rank files: every rank then
  restarts from rank 0's weights (a consensus restart) and keeps whatever momentum its optimizer holds (none in a
  fresh process).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Iterator
from typing import Any, Literal

import deepspeed
import torch
import torch.distributed as dist
from pydantic import Field, ValidationError

from ds_spngd.checkpoint import Fault, atomic_save
from ds_spngd.integrations.deepspeed.checkpoint import agree_faults, resolve_tag
from ds_spngd.integrations.deepspeed.construction import step_disabled
from ds_spngd.integrations.deepspeed.decentralized import DecentLaM, DecentralizedOptimizer, DmSGD
from ds_spngd.integrations.deepspeed.ds_config import fp16_enabled, optimizer_type, zero_stage
from ds_spngd.integrations.deepspeed.first_order import OptimizerConfigError, StrictParams, format_param_errors
from ds_spngd.integrations.deepspeed.noise_scale import parse_noise_scale

__all__ = ["DECENTRALIZED_TYPES", "DecentralizedCheckpointError", "DecentralizedConfigError", "DecentralizedParams",
           "attach_decentralized_checkpoint", "consensus_parameters", "get_decentralized", "initialize_decentralized",
           "is_decentralized_config", "parse_decentralized"]  # fmt: skip

logger = logging.getLogger("ds_spngd")

CLASSES: dict[str, type[DecentralizedOptimizer]] = {"decentlam": DecentLaM, "dmsgd": DmSGD}
DECENTRALIZED_TYPES: tuple[str, ...] = tuple(CLASSES)
SECTION_KEYS = frozenset({"type", "params"})
RANK_FILE = "decentralized_rank{rank:05d}.pt"


class DecentralizedConfigError(OptimizerConfigError):
    """Invalid or unsupported DecentLaM / DmSGD configuration; the message names every offending key (a subclass of
    :class:`ds_spngd.SPNGDConfigError`, so one ``except`` catches every config error of ``ds_spngd.initialize``)."""


class DecentralizedCheckpointError(RuntimeError):
    """A DecentLaM / DmSGD checkpoint tag cannot be resumed per rank (raised on every rank together)."""


class DecentralizedParams(StrictParams):
    """``params`` of ``"DecentLaM"`` / ``"DmSGD"`` (:mod:`.decentralized`).

    Attributes:
        lr: learning rate γ (> 0; DeepSpeed's scheduler drives it, 0 allowed there).
        momentum: β in [0, 1).
        weight_decay: L2 coefficient (>= 0), added to the gradient.
        topology: ``"ring"``, ``"exponential"`` (static exponential graph), ``"one_peer_exponential"``
            (time-varying, one peer per step) or ``"complete"`` (equals all-reduce momentum SGD).
    """

    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    topology: Literal["ring", "exponential", "one_peer_exponential", "complete"] = "ring"


def _type_of(ds_config: dict[str, Any]) -> str | None:
    name = optimizer_type(ds_config)
    return name if name in CLASSES else None


def is_decentralized_config(ds_config: dict[str, Any]) -> bool:
    """True when the optimizer section selects ``"DecentLaM"`` or ``"DmSGD"`` (case-insensitive)."""
    return _type_of(ds_config) is not None


def parse_decentralized(ds_config: dict[str, Any]) -> tuple[str, DecentralizedParams]:
    """Validate the engine settings and the DecentLaM / DmSGD section of a DeepSpeed config.

    Returns:
        ``(name, params)``: ``"decentlam"`` or ``"dmsgd"`` and the frozen :class:`DecentralizedParams`.

    Raises:
        DecentralizedConfigError: every unknown section key (``optimizer.X``), unknown / invalid parameter
            (``optimizer.params.X``), ``zero_optimization.stage`` >= 1, ``fp16.enabled``, an enabled
            ``gradient_noise_scale``; all offending keys in one message.
    """
    name = _type_of(ds_config)
    if name is None:
        raise DecentralizedConfigError("optimizer.type must be DecentLaM or DmSGD")
    section = ds_config["optimizer"]
    label = "DecentLaM" if name == "decentlam" else "DmSGD"
    lines = [f"  optimizer.{k}: unknown key (the section takes {sorted(SECTION_KEYS)})"
             for k in sorted(set(section) - SECTION_KEYS)]  # fmt: skip
    raw = section.get("params")
    raw = {} if raw is None else raw
    params: DecentralizedParams | None = None
    if not isinstance(raw, dict):
        lines.append(f"  optimizer.params: must be a JSON object, got {type(raw).__name__}")
    else:
        try:
            params = DecentralizedParams(**raw)
        except ValidationError as err:
            lines += format_param_errors(err, "optimizer.params")
    lines += _engine_refusals(ds_config, label)
    if lines or params is None:
        raise DecentralizedConfigError(f"invalid {label} config:\n" + "\n".join(lines))
    return name, params


def _engine_refusals(ds_config: dict[str, Any], label: str) -> list[str]:
    """One line per engine setting the decentralized optimizers cannot run under."""
    lines = []
    stage = zero_stage(ds_config)
    if stage != 0:
        lines.append(f"  zero_optimization.stage: {stage} is not supported with {label}: ZeRO reduce-scatters the "
                     "gradients in its own hooks, so no rank keeps its local gradient; use stage 0")
    if fp16_enabled(ds_config):
        lines.append(f"  fp16.enabled: not supported with {label} (DeepSpeed 0.19.8's stage-0 fp16 wrapper divides "
                     "the update by the loss scale without scaling the loss); use bf16 or fp32")
    try:
        noise = parse_noise_scale(ds_config).enabled
    except ValueError as err:
        lines.append(f"  gradient_noise_scale: {err}")
    else:
        if noise:
            lines.append(f"  gradient_noise_scale.enabled: not supported with {label}: it measures around "
                         "DeepSpeed's gradient all-reduce, which decentralized training turns off")
    return lines


def get_decentralized(engine_or_optimizer: Any) -> DecentralizedOptimizer | None:
    """The DecentLaM / DmSGD optimizer behind a DeepSpeed engine or optimizer wrapper, or None."""
    wrapper = getattr(engine_or_optimizer, "optimizer", None)
    for obj in (engine_or_optimizer, getattr(engine_or_optimizer, "basic_optimizer", None), wrapper,
                getattr(wrapper, "optimizer", None)):  # engine.basic_optimizer (PATCHES), a wrapper's .optimizer
        if isinstance(obj, DecentralizedOptimizer):
            return obj
    return None


def initialize_decentralized(ds_config: dict[str, Any], ds_kwargs: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` for a DecentLaM / DmSGD config (called by ``ds_spngd.initialize``; see the module
    docstring).

    Args:
        ds_config: the loaded DeepSpeed config (a private copy; modified here).
        ds_kwargs: deepspeed.initialize's keyword arguments, ``args`` without a config path.

    Returns:
        deepspeed.initialize's ``(engine, optimizer, training_dataloader, lr_scheduler)``.

    Raises:
        DecentralizedConfigError: as :func:`parse_decentralized`.
        ValueError: an optimizer object was passed as well, or neither model nor model_parameters.
    """
    name, hyper = parse_decentralized(ds_config)
    label = CLASSES[name].name
    if ds_kwargs.get("optimizer") is not None:
        raise ValueError(f"the config selects optimizer type {label}, but an optimizer object was passed as well")
    if "gradient_clipping" not in ds_config:
        ds_config["gradient_clipping"] = 0.0
        logger.info("%s: gradient_clipping not set; using 0 (DeepSpeed's default 1.0 would rescale gradients)", label)
    del ds_config["optimizer"]
    model, model_parameters = ds_kwargs.get("model"), ds_kwargs.get("model_parameters")
    if model_parameters is not None:
        params = list(model_parameters)
    elif model is not None:
        params = list(model.parameters())
    else:
        raise ValueError(f"{label} needs the parameters: pass model= or model_parameters=")
    optimizer = CLASSES[name](params, **hyper.model_dump())
    with step_disabled(optimizer):  # DeepSpeed's precision wrappers call step() once while being built
        built = deepspeed.initialize(**{**ds_kwargs, "optimizer": optimizer, "model_parameters": params,
                                        "config": ds_config})  # fmt: skip
    engine = built[0]
    engine.enable_backward_allreduce = False  # each rank keeps its local gradient (PATCHES)
    optimizer.set_group(getattr(engine, "data_parallel_group", None))
    attach_decentralized_checkpoint(engine, optimizer)
    return built


@contextlib.contextmanager
def consensus_parameters(engine: Any) -> Iterator[None]:
    """Within the block every rank's model holds the consensus ``x̄ = (1/n) Σ_i x_i`` of the data-parallel group
    (one fp32 all-reduce per parameter dtype); afterwards each rank's own parameters are back, bitwise. A no-op for an
    engine whose optimizer is not DecentLaM / DmSGD. A collective: every rank must enter it."""
    opt = get_decentralized(engine)
    if opt is None or opt.world()[1] == 1:
        yield
        return
    params = [p for p in engine.module.parameters()]
    saved = [p.detach().clone() for p in params]
    flat = torch.cat([p.detach().reshape(-1).float() for p in params])
    dist.all_reduce(flat, group=opt.group)
    flat.div_(opt.world()[1])
    with torch.no_grad():
        for p, v in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.copy_(v.view_as(p))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def attach_decentralized_checkpoint(engine: Any, optimizer: DecentralizedOptimizer) -> None:
    """Wrap ``engine.save_checkpoint`` / ``engine.load_checkpoint`` so every rank also writes / reads its own
    parameters and momentum (``decentralized_rank<r>.pt`` in the tag directory; see the module docstring;
    :data:`.patches.PATCHES` ``engine.save_checkpoint``, ``engine.load_checkpoint``)."""
    orig_save, orig_load = engine.save_checkpoint, engine.load_checkpoint

    def save_checkpoint(save_dir: str, tag: Any = None, *a: Any, **k: Any) -> Any:
        out = orig_save(save_dir, tag, *a, **k)
        tag_dir = os.path.join(save_dir, str(tag if tag is not None else f"global_step{engine.global_steps}"))
        _save_rank_file(engine, optimizer, tag_dir)
        return out

    def load_checkpoint(load_dir: str, tag: Any = None, *a: Any, **k: Any) -> Any:
        bound = inspect.signature(orig_load).bind(load_dir, tag, *a, **k)
        if not bound.arguments.get("load_optimizer_states", True):
            return orig_load(*bound.args, **bound.kwargs)
        tag = resolve_tag(engine, load_dir, tag)
        state = _read_rank_file(engine, optimizer, os.path.join(load_dir, str(tag))) if tag is not None else None
        bound.arguments["tag"] = tag
        out = orig_load(*bound.args, **bound.kwargs)
        if state is not None and (out[0] if isinstance(out, tuple) else None) is not None:
            _apply_rank_state(engine, optimizer, state)
        return out

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint


def _params(optimizer: DecentralizedOptimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _agree(fault: str, optimizer: DecentralizedOptimizer, tag_dir: str) -> list[str]:
    """Every rank's fault message ('' for none), as ``"rank r: ..."`` lines, agreed over the default group by the
    checkpoint glue's :func:`~ds_spngd.integrations.deepspeed.checkpoint.agree_faults` (one MAX all-reduce, reached
    by every rank; the messages gathered only when some rank has one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [fault] if fault else []
    params = _params(optimizer)
    device = params[0].device if params and "nccl" in str(dist.get_backend()) else torch.device("cpu")
    faults = [Fault(fault, [], [dist.get_rank()])] if fault else []
    return [f"rank {r}: {f.text}" for r, _, fs in agree_faults(faults, tag_dir, device) for f in fs]


def _save_rank_file(engine: Any, optimizer: DecentralizedOptimizer, tag_dir: str) -> None:
    """Write this rank's parameters (the optimizer's, and the module's where a bf16 wrapper keeps separate fp32
    copies) and optimizer state atomically; raises on every rank when any rank failed."""
    rank, n = optimizer.world()
    fault = ""
    try:
        os.makedirs(tag_dir, exist_ok=True)
        path = os.path.join(tag_dir, RANK_FILE.format(rank=rank))
        state = {"world_size": n, "rank": rank, "type": optimizer.name, "topology": optimizer.topology,
                 "params": [p.detach().clone() for p in _params(optimizer)],
                 "module": [p.detach().clone() for p in engine.module.parameters()],
                 "optimizer": optimizer.state_dict()}
        atomic_save(state, path)
    except Exception as err:  # noqa: BLE001 - every rank must learn of it
        fault = f"could not write its file: {type(err).__name__}: {err}"
    faults = _agree(fault, optimizer, tag_dir)
    if faults:
        raise DecentralizedCheckpointError(f"{optimizer.name} checkpoint {tag_dir} not saved completely:\n  "
                                           + "\n  ".join(faults))


def _read_rank_file(engine: Any, optimizer: DecentralizedOptimizer, tag_dir: str) -> dict[str, Any] | None:
    """This rank's saved state, after every rank agreed that all files are there and fit; raises on every rank."""
    rank, n = optimizer.world()
    path = os.path.join(tag_dir, RANK_FILE.format(rank=rank))
    state: dict[str, Any] | None = None
    fault = ""
    if not os.path.isdir(tag_dir):  # no tag directory: DeepSpeed warns and loads nothing; so do we
        pass
    elif not os.path.isfile(path):
        fault = f"{os.path.basename(path)} is missing (not saved through ds_spngd.initialize's engine?)"
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - every rank must learn of it
            fault = f"{os.path.basename(path)} is unreadable: {type(err).__name__}: {err}"
        else:
            saved = (state.get("world_size"), len(state.get("params", [])), len(state.get("module", [])))
            here = (n, len(_params(optimizer)), len(list(engine.module.parameters())))
            if saved != here:
                fault = (f"{os.path.basename(path)} was saved by {saved[0]} ranks with {saved[1]} parameters; this "
                         f"run has {here[0]} and {here[1]}")
    faults = _agree(fault, optimizer, tag_dir)
    if faults:
        raise DecentralizedCheckpointError(
            f"{optimizer.name} checkpoint {tag_dir} cannot be resumed per rank (nothing was loaded):\n  "
            + "\n  ".join(faults) + "\n  load with load_optimizer_states=False to restart every rank from rank 0's "
            "weights")
    return state


def _apply_rank_state(engine: Any, optimizer: DecentralizedOptimizer, state: dict[str, Any]) -> None:
    with torch.no_grad():
        for p, saved in zip(list(engine.module.parameters()), state["module"], strict=True):
            p.copy_(saved.to(p.device, p.dtype))
        for p, saved in zip(_params(optimizer), state["params"], strict=True):
            p.copy_(saved.to(p.device, p.dtype))
    optimizer.load_state_dict(state["optimizer"])
