"""Checks that make a wrong start loud: how much of the model SP-NGD preconditions, and whether an engine replaced
the optimizer's parameters without gluing SP-NGD to it.

* :func:`warn_if_little_preconditioned` (at construction): when Fisher blocks cover less than
  ``min_preconditioned_fraction`` of the optimizer's trainable parameter elements (or none), rank 0 logs a warning on
  the ``ds_spngd`` logger naming the fraction and the largest parameters left to the plain momentum-SGD update, with
  the reasons :meth:`ds_spngd.SPNGD.report` gives for their modules (``SPNGD.fallback``).
* :class:`ParamGuard` (at the top of every step of an SP-NGD no engine integration set up): DeepSpeed's
  wrappers (bf16/fp16 fp32 copies, ZeRO 1/2/3 flat or empty partitions) replace ``param_groups[i]["params"]`` by new
  lists; an SP-NGD handed to ``deepspeed.initialize`` directly then cannot find its layers' gradients, so it raises
  a ``RuntimeError`` naming ``ds_spngd.initialize`` instead of stepping. The check reads only the optimizer's own
  structure, which is the same on every rank, so every rank raises the same error at the same step.
"""

from __future__ import annotations

import logging
from itertools import chain
from typing import TYPE_CHECKING, Any, NamedTuple

from torch import Tensor, nn
from torch import distributed as dist

from ds_spngd.curvature.base import full_numel, full_shape

if TYPE_CHECKING:
    from ds_spngd.optimizer import SPNGD

__all__ = ["FallbackParam", "NOT_ATTACHED_MESSAGE", "ParamGuard", "coverage", "fallback_params",
           "low_coverage_message", "warn_if_little_preconditioned"]

logger = logging.getLogger("ds_spngd")

MAX_LISTED = 10  # fallback parameters named in the warning; the rest are counted

SUPPORTED_LAYERS = ("nn.Linear, nn.Conv2d, Hugging Face Conv1D, nn.Embedding (and a tied embedding / bias-free head), "
                    "BatchNorm, LayerNorm and RMSNorm")

NOT_ATTACHED_MESSAGE = (
    "SP-NGD's param_groups no longer hold the parameters it was built with, and no engine integration set it up: "
    "it was handed to deepspeed.initialize(optimizer=...) directly (DeepSpeed replaced its parameters by fp32 copies "
    "or ZeRO partitions), or a wrapper rebuilt its param groups. Stepping now would precondition the wrong tensors. "
    "Initialize DeepSpeed with ds_spngd.initialize(...) instead, with the same arguments (it takes this SP-NGD as "
    'optimizer=, or builds it from "optimizer": {"type": "SPNGD", "params": {...}} in the DeepSpeed config) and glues '
    "SP-NGD to the engine. Hugging Face Trainer / Accelerate users: use ds_spngd.integrations.transformers / "
    "ds_spngd.integrations.accelerate."
)


class FallbackParam(NamedTuple):
    """A trainable parameter of the optimizer that no Fisher block preconditions.

    Attributes:
        name: its name in ``model.named_parameters()`` (``param_groups[g][i]`` when it is not the model's).
        shape: its shape.
        numel: its number of elements.
        module: the name of the module holding it (the model's class name for the root; "" when not in the model).
        module_type: that module's class name ("" when not in the model).
        reason: why that module has no Fisher block (from ``SPNGD.fallback``, as :meth:`SPNGD.report` lists it).
    """

    name: str
    shape: tuple[int, ...]
    numel: int
    module: str
    module_type: str
    reason: str


def _trainable(optimizer: SPNGD) -> list[Tensor]:
    """The optimizer's own parameters (as built, ``param_groups`` order) that require a gradient."""
    return [p for p in optimizer.model_parameters if p.requires_grad]


def coverage(optimizer: SPNGD) -> tuple[int, int]:
    """(trainable parameter elements preconditioned by a Fisher block, trainable parameter elements in all) of the
    parameters the optimizer was built with (logical sizes: a ZeRO-3 partitioned parameter counts whole)."""
    covered = {id(p) for b in optimizer.blocks for p in b.params}
    params = _trainable(optimizer)
    return sum(full_numel(p) for p in params if id(p) in covered), sum(full_numel(p) for p in params)


def fallback_params(optimizer: SPNGD, model: nn.Module) -> list[FallbackParam]:
    """The optimizer's trainable parameters without a Fisher block, largest first (ties: ``param_groups`` order),
    each with its module and the reason :meth:`SPNGD.report` gives for that module."""
    covered = {id(p) for b in optimizer.blocks for p in b.params}
    names = {id(p): n for n, p in model.named_parameters()}
    holders: dict[int, tuple[str, nn.Module]] = {}
    for mname, module in model.named_modules():
        for p in module.parameters(recurse=False):
            holders.setdefault(id(p), (mname or type(module).__name__, module))
    reasons = dict(optimizer.fallback)
    out = []
    for k, p in enumerate(_trainable(optimizer)):
        if id(p) in covered:
            continue
        label, module = holders.get(id(p), ("", None))
        reason = reasons.get(label, "no Fisher block") if module is not None else "not a parameter of the model"
        kind = "" if module is None else type(module).__name__
        name = names.get(id(p), f"parameter #{k}")
        out.append((k, FallbackParam(name, tuple(full_shape(p)), full_numel(p), label, kind, reason)))
    return [entry for _, entry in sorted(out, key=lambda t: (-t[1].numel, t[0]))]


def low_coverage_message(optimizer: SPNGD, model: nn.Module) -> str | None:
    """The warning of :func:`warn_if_little_preconditioned`, or None when the coverage is enough (or nothing
    trains)."""
    covered, total = coverage(optimizer)
    threshold = optimizer.cfg.min_preconditioned_fraction
    fraction = covered / total if total else 1.0
    if total == 0 or (covered > 0 and fraction >= threshold):
        return None
    rest = fallback_params(optimizer, model)
    head = (f"SP-NGD: Fisher blocks precondition {fraction:.1%} of the optimizer's {total:,} trainable parameter "
            f"elements ({covered:,})")
    head += (": nothing is preconditioned" if covered == 0
             else f", below min_preconditioned_fraction={threshold:g}")
    lines = [f"{head}; {total - covered:,} elements in {len(rest)} parameter(s) train with the plain momentum-SGD "
             "update instead (largest first):"]
    for f in rest[:MAX_LISTED]:
        where = f"{f.module} ({f.module_type})" if f.module_type else "outside the model"
        lines.append(f"  {f.name} {list(f.shape)} = {f.numel:,} elements, in {where}: {f.reason}")
    if len(rest) > MAX_LISTED:
        lines.append(f"  and {len(rest) - MAX_LISTED} more")
    lines.append(f"Fisher blocks exist for {SUPPORTED_LAYERS} (SPNGD.report() lists every module); "
                 "optimizer.params.min_preconditioned_fraction sets this warning's threshold.")
    return "\n".join(lines)


def warn_if_little_preconditioned(optimizer: SPNGD, model: nn.Module) -> str | None:
    """Log :func:`low_coverage_message` as a warning on the ``ds_spngd`` logger, on rank 0 only (every process when
    torch.distributed is not initialized).

    Returns:
        The message (on every rank), or None when nothing was worth a warning.
    """
    message = low_coverage_message(optimizer, model)
    if message is not None and (not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0):
        logger.warning("%s", message)
    return message


class ParamGuard:
    """Remembers the parameter lists of an optimizer's ``param_groups`` at construction; :meth:`check` raises when
    they no longer hold the parameters the optimizer was built with.

    Args:
        groups: the optimizer's ``param_groups`` as built (their ``params`` lists are remembered, not copied).
    """

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        self.lists: list[list[Tensor]] = [g["params"] for g in groups]
        self.params: list[Tensor] = list(chain.from_iterable(self.lists))
        self.sizes = [len(own) for own in self.lists]

    def check(self, groups: list[dict[str, Any]]) -> None:
        """Cheap when nothing changed (O(groups): the ``params`` list objects and their lengths); otherwise the
        parameters are compared one by one with those at construction (a wrapper may rebuild the lists with the same
        tensors: then the new lists are remembered).

        Raises:
            RuntimeError: :data:`NOT_ATTACHED_MESSAGE` (it depends on local structure only: identical on every rank).
        """
        if len(groups) == len(self.lists) and all(
                g["params"] is own and len(own) == n for g, own, n in zip(groups, self.lists, self.sizes, strict=True)):
            return
        now = list(chain.from_iterable(g["params"] for g in groups))
        if len(now) != len(self.params) or any(a is not b for a, b in zip(now, self.params, strict=True)):
            raise RuntimeError(NOT_ATTACHED_MESSAGE)
        self.lists = [g["params"] for g in groups]
        self.sizes = [len(own) for own in self.lists]
