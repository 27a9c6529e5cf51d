"""LARS and LAMB first-order baselines selectable from the DeepSpeed JSON, on CPU as well as on GPU.

DeepSpeed 0.19.8 has no LARS, and its ``"Lamb"`` is FusedLamb, a CUDA op that raises on CPU. ``ds_spngd.initialize``
therefore builds the layer-wise optimizers of the maintained ``pytorch-optimizer`` package (``pytorch_optimizer.LARS``,
``pytorch_optimizer.Lamb``) on the model's parameters and hands them to ``deepspeed.initialize`` as client
optimizers; DeepSpeed's JSON ``scheduler`` drives their ``lr`` as for its own optimizers. Config section::

    "optimizer": {"type": "LARS", "impl": "auto", "params": {"lr": 0.4, "momentum": 0.9, ...}}

``type`` is ``"LARS"`` or ``"Lamb"`` (case-insensitive); ``impl`` (default ``"auto"``) picks the implementation:

* ``"pytorch_optimizer"``: the pytorch-optimizer class, on any device;
* ``"deepspeed"``: DeepSpeed's own optimizer (FusedLamb; CUDA only; DeepSpeed has no LARS);
* ``"auto"``: DeepSpeed's FusedLamb for ``"Lamb"`` when DeepSpeed's accelerator is CUDA, pytorch-optimizer otherwise.

The pytorch-optimizer ``params`` are validated here (pydantic, ``extra="forbid"``): an unknown key, a wrong type or
an out-of-range value raises :class:`OptimizerConfigError` naming the key. Defaults are the library's. FusedLamb's
``params`` are left to DeepSpeed. The two LAMBs differ in details (pytorch-optimizer's has no bias correction and
decouples weight decay unless ``weight_decouple`` is false), so CPU and GPU ``"Lamb"`` runs are not bit-comparable.

Seam: ``deepspeed.initialize(optimizer=...)``, DeepSpeed's client-optimizer argument; no DeepSpeed object is patched.
The optimizer's own ``step`` is gated while DeepSpeed builds its wrappers (:mod:`.construction`; ``optimizer.step`` in
:data:`.patches.PATCHES`).

References: You, Gitman & Ginsburg 2017, arXiv:1708.03888 (LARS); You et al. 2020, arXiv:1904.00962 (LAMB).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal

import deepspeed
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from ds_spngd.config import SPNGDConfigError
from ds_spngd.integrations.deepspeed.construction import step_disabled
from ds_spngd.integrations.deepspeed.ds_config import fp16_enabled, optimizer_type, zero_stage

logger = logging.getLogger("ds_spngd")

__all__ = ["FIRST_ORDER_TYPES", "LambParams", "LarsParams", "OptimizerConfigError", "StrictParams", "build_first_order",
           "deepspeed_has_fused_lamb", "format_param_errors", "initialize_first_order", "is_first_order_config",
           "parse_first_order", "resolve_impl"]  # fmt: skip

IMPLS: tuple[str, ...] = ("auto", "deepspeed", "pytorch_optimizer")
SECTION_KEYS = frozenset({"type", "impl", "params"})


class OptimizerConfigError(SPNGDConfigError):
    """Invalid LARS / LAMB optimizer section; the message names every offending key. A subclass of
    :class:`ds_spngd.SPNGDConfigError` (and so of ValueError): one ``except`` catches every config error that
    ``ds_spngd.initialize`` raises."""


class StrictParams(BaseModel):
    """Base of the optimizer ``params`` schemas of the glue (LARS / Lamb here, DecentLaM / DmSGD): unknown keys
    forbidden, frozen, no boolean where a number belongs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v: Any, info: Any) -> Any:
        # pydantic's lax mode reads JSON true/false as 1/0 for numbers; a boolean belongs only in boolean fields
        field = cls.model_fields[info.field_name]
        if isinstance(v, bool) and field.annotation is not bool:
            raise ValueError("expected a number, got a boolean")
        return v


class LarsParams(StrictParams):
    """``params`` of ``pytorch_optimizer.LARS`` (You et al. 2017): per weight matrix/kernel (``ndim > 1``) the step
    is ``lr · trust_coefficient · ‖w‖ / (‖g‖ + weight_decay·‖w‖) · (g + weight_decay·w)`` before momentum; vectors
    (biases, norm scales) get plain momentum SGD without weight decay or trust ratio.

    Attributes:
        lr: global learning rate (> 0; DeepSpeed's scheduler drives it).
        momentum: heavy-ball momentum in [0, 1).
        weight_decay: L2 coefficient (>= 0), weight matrices only.
        dampening: momentum dampening in [0, 1).
        trust_coefficient: η of the trust ratio (> 0).
        nesterov: Nesterov momentum.
    """

    lr: float = Field(1e-3, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    dampening: float = Field(0.0, ge=0.0, lt=1.0)
    trust_coefficient: float = Field(1e-3, gt=0.0)
    nesterov: StrictBool = False


class LambParams(StrictParams):
    """``params`` of ``pytorch_optimizer.Lamb`` (You et al. 2020, version 3 of the paper): Adam's moments without
    bias correction, the update scaled per tensor by ``min(‖w‖, 10) / ‖update‖``.

    Attributes:
        lr: learning rate (> 0; DeepSpeed's scheduler drives it).
        betas: ``[β1, β2]``, each in [0, 1).
        eps: added to the root of the second moment (>= 0).
        weight_decay: decay coefficient (>= 0).
        weight_decouple: true: decoupled decay ``w ← w·(1 − lr·weight_decay)`` (AdamW style); false: ``weight_decay·w``
            added to the Adam update inside the trust ratio (the LAMB paper, and DeepSpeed's FusedLamb).
        fixed_decay: decoupled decay not scaled by lr.
        grad_averaging: scale the gradient by ``1 − β1`` in the first moment.
        adam: trust ratio 1 (plain Adam without bias correction), for ablations.
        pre_norm: divide the gradients by ``max(1, ‖g‖ / max_grad_norm)`` first (global norm).
        max_grad_norm: reference norm of ``pre_norm`` (>= 0; 0 disables).
    """

    lr: float = Field(1e-3, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-6, ge=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    weight_decouple: StrictBool = True
    fixed_decay: StrictBool = False
    grad_averaging: StrictBool = True
    adam: StrictBool = False
    pre_norm: StrictBool = False
    max_grad_norm: float = Field(1.0, ge=0.0)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        for i, beta in enumerate(v):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"beta{i + 1} must lie in [0, 1), got {beta}")
        return v


SCHEMAS: dict[str, type[StrictParams]] = {"lars": LarsParams, "lamb": LambParams}
FIRST_ORDER_TYPES: tuple[str, ...] = tuple(SCHEMAS)


def _type_of(ds_config: dict[str, Any]) -> str | None:
    name = optimizer_type(ds_config)
    return name if name in SCHEMAS else None


def is_first_order_config(ds_config: dict[str, Any]) -> bool:
    """True when the optimizer section selects ``"LARS"`` or ``"Lamb"`` (case-insensitive)."""
    return _type_of(ds_config) is not None


def deepspeed_has_fused_lamb() -> bool:
    """Whether DeepSpeed's FusedLamb can run here: DeepSpeed's accelerator is CUDA."""
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().device_name() == "cuda")


def resolve_impl(ds_config: dict[str, Any]) -> Literal["deepspeed", "pytorch_optimizer"]:
    """Which implementation a LARS / Lamb section runs (``impl`` resolved, see the module docstring).

    Raises:
        OptimizerConfigError: not a LARS / Lamb section, an unknown ``impl``, ``"deepspeed"`` for LARS, or
            ``"deepspeed"`` for Lamb where DeepSpeed's accelerator is not CUDA.
    """
    name = _type_of(ds_config)
    if name is None:
        raise OptimizerConfigError("optimizer.type must be LARS or Lamb")
    impl = ds_config["optimizer"].get("impl", "auto")
    if impl not in IMPLS:
        raise OptimizerConfigError(f"invalid optimizer config:\n  optimizer.impl: must be one of {list(IMPLS)} "
                                   f"(got {impl!r})")  # fmt: skip
    if impl == "auto":
        return "deepspeed" if name == "lamb" and deepspeed_has_fused_lamb() else "pytorch_optimizer"
    if impl == "deepspeed":
        if name == "lars":
            raise OptimizerConfigError("optimizer.impl='deepspeed': DeepSpeed has no LARS; use 'pytorch_optimizer' "
                                       "or 'auto'")  # fmt: skip
        if not deepspeed_has_fused_lamb():
            raise OptimizerConfigError(
                "optimizer.impl='deepspeed' selects DeepSpeed's FusedLamb, a CUDA op, but DeepSpeed's accelerator is "
                "not CUDA here; use 'pytorch_optimizer' or 'auto' (pytorch-optimizer's Lamb)"
            )
    return "deepspeed" if impl == "deepspeed" else "pytorch_optimizer"


def format_param_errors(err: ValidationError, prefix: str) -> list[str]:
    """One line per offending key of a :class:`StrictParams` validation error, prefixed with the JSON path."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {prefix}.{loc}: {e['msg']}{got_s}" if loc else f"  {prefix}: {e['msg']}{got_s}")
    return lines


def parse_first_order(ds_config: dict[str, Any]) -> tuple[str, StrictParams]:
    """Validate a LARS / Lamb section for the pytorch-optimizer implementation.

    Returns:
        ``(name, params)``: ``"lars"`` or ``"lamb"`` and a frozen :class:`LarsParams` / :class:`LambParams`.

    Raises:
        OptimizerConfigError: naming every unknown section key (``optimizer.X``), unknown parameter, wrong type or
            out-of-range value (``optimizer.params.X``); also a non-object ``params`` or a bad ``impl``.
    """
    name = _type_of(ds_config)
    if name is None:
        raise OptimizerConfigError("optimizer.type must be LARS or Lamb")
    section = ds_config["optimizer"]
    lines = [f"  optimizer.{k}: unknown key (the section takes {sorted(SECTION_KEYS)})"
             for k in sorted(set(section) - SECTION_KEYS)]  # fmt: skip
    if section.get("impl", "auto") not in IMPLS:
        lines.append(f"  optimizer.impl: must be one of {list(IMPLS)} (got {section['impl']!r})")
    raw = section.get("params")
    raw = {} if raw is None else raw
    params: StrictParams | None = None
    if not isinstance(raw, dict):
        lines.append(f"  optimizer.params: must be a JSON object, got {type(raw).__name__}")
    else:
        try:
            params = SCHEMAS[name](**raw)
        except ValidationError as err:
            lines += format_param_errors(err, "optimizer.params")
    if lines or params is None:
        label = "LARS" if name == "lars" else "Lamb (pytorch-optimizer)"
        raise OptimizerConfigError(f"invalid {label} config:\n" + "\n".join(lines))
    return name, params


def build_first_order(name: str, params: StrictParams, model_parameters: Iterable[Any]) -> torch.optim.Optimizer:
    """Construct ``pytorch_optimizer.LARS`` / ``pytorch_optimizer.Lamb`` on ``model_parameters`` (tensors or
    parameter-group dicts) with the validated ``params`` (``betas`` as a tuple).

    Raises:
        ImportError: pytorch-optimizer is not installed (message gives the pip command).
    """
    try:
        import pytorch_optimizer
    except ImportError as exc:
        hint = "pip install 'pytorch-optimizer>=4.1,<5'"
        raise ImportError(f"LARS / Lamb from pytorch-optimizer need the package: {hint}") from exc
    cls = pytorch_optimizer.LARS if name == "lars" else pytorch_optimizer.Lamb
    optimizer: torch.optim.Optimizer = cls(list(model_parameters), **params.model_dump())
    return optimizer


def initialize_first_order(ds_config: dict[str, Any], ds_kwargs: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` for a LARS / Lamb config (called by ``ds_spngd.initialize``).

    Args:
        ds_config: the loaded DeepSpeed config (a private copy; modified here).
        ds_kwargs: deepspeed.initialize's keyword arguments, ``args`` without a config path.

    DeepSpeed's FusedLamb runs when ``impl`` resolves to ``"deepspeed"`` (the section is passed on minus ``impl``);
    otherwise the pytorch-optimizer class is built on ``model_parameters`` (or ``model.parameters()``) and passed as
    the client optimizer with the ``optimizer`` section removed. Its ``step`` is a no-op while DeepSpeed builds its
    wrappers (the bf16 wrapper steps once with zero gradients, which would move LARS weights by the weight-decay
    term; :func:`ds_spngd.integrations.deepspeed.construction.step_disabled`, as for SP-NGD);
    ``gradient_clipping`` is set to 0 when the JSON does not set it (DeepSpeed 0.19.8 clips at 1.0 by default, as
    for SP-NGD).

    Returns:
        deepspeed.initialize's ``(engine, optimizer, training_dataloader, lr_scheduler)``.

    Raises:
        OptimizerConfigError: invalid section (names the key), ZeRO stage > 0 (per-tensor trust ratios need whole
            parameters) or fp16 (DeepSpeed 0.19.8's stage-0 fp16 wrapper under-steps) with pytorch-optimizer.
        ValueError: an optimizer object was passed as well, or neither model nor model_parameters.
    """
    section = ds_config["optimizer"]
    name = str(section.get("type"))
    if resolve_impl(ds_config) == "deepspeed":
        section.pop("impl", None)
        return deepspeed.initialize(**{**ds_kwargs, "config": ds_config})
    if ds_kwargs.get("optimizer") is not None:
        raise ValueError(f"the config selects optimizer type {name}, but an optimizer object was passed as well")
    kind, hyper = parse_first_order(ds_config)
    stage = zero_stage(ds_config)
    if stage != 0:
        raise OptimizerConfigError(
            f"zero_optimization.stage={stage} is not supported with {name} from pytorch-optimizer: its per-layer "
            "trust ratios need whole parameters, but under ZeRO the optimizer sees flat partitions. Use stage 0."
        )
    if fp16_enabled(ds_config):
        raise OptimizerConfigError(
            f"fp16.enabled=true is not supported with {name} from pytorch-optimizer (ZeRO stage 0: DeepSpeed 0.19.8's "
            "fp16 wrapper divides the update by the loss scale without scaling the loss); use bf16 or fp32."
        )
    if "gradient_clipping" not in ds_config:
        ds_config["gradient_clipping"] = 0.0
        logger.info("%s: gradient_clipping not set; using 0 (DeepSpeed's default 1.0 would rescale gradients)", name)
    del ds_config["optimizer"]
    model, model_parameters = ds_kwargs.get("model"), ds_kwargs.get("model_parameters")
    if model_parameters is not None:
        params = list(model_parameters)
    elif model is not None:
        params = list(model.parameters())
    else:
        raise ValueError(f"{name} needs the parameters: pass model= or model_parameters=")
    optimizer = build_first_order(kind, hyper, params)
    with step_disabled(optimizer):  # DeepSpeed's precision wrappers call step() once while being built
        return deepspeed.initialize(**{**ds_kwargs, "optimizer": optimizer, "model_parameters": params,
                                       "config": ds_config})  # fmt: skip
