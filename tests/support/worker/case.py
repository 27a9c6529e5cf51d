"""The case schema: every JSON key a test may put in a case, in one place, checked when the worker reads it.

A case is a JSON object; :func:`parse_case` turns it into a :class:`Case` and raises :class:`CaseError` on a key the
schema does not know (a typo fails loudly instead of silently running the default), a missing required key, or a
value of the wrong type or outside the choices the worker interprets. Values the library interprets itself
(``inverse_method``, ``mode``, ``comm_dtype``, ``nonfinite``, ...) are passed through for SP-NGD's config to check.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

Extra = Literal["never", "rank0", "rank0_nograd", "twice"]
Groups = Literal["wd", "lr"]
InjectKind = Literal["factor", "grad", "inversion", "inversion_nan", "late"]


class CaseError(ValueError):
    """A case the schema rejects (unknown key, missing required key, wrong type or value)."""


@dataclass(frozen=True)
class Inject:
    """A fault on one rank, from step ``step`` for ``steps`` steps (``"inject"``).

    Attributes:
        kind: "factor": scale that rank's micro-batch by 1e19 (its factor statistics overflow, the gradients stay
            finite: LayerNorm follows fc1); "grad": multiply the first parameter's gradient by Inf before DeepSpeed's
            reduction; "inversion" / "inversion_nan": the drafts of the blocks that rank owns raise a LinAlgError /
            return NaN; "late": no fault of its own, it names the rank and step for ``extra: "twice"``.
        rank: the faulty rank.
        step: the first faulty step.
        steps: how many steps in a row.
    """

    kind: InjectKind
    rank: int
    step: int
    steps: int = 1

    def active(self, rank: int, step: int) -> bool:
        """True on the faulty rank during the faulty steps."""
        return rank == self.rank and self.step <= step < self.step + self.steps


@dataclass(frozen=True)
class Case:
    """One run of the tiny net through the real DeepSpeed engine (see :mod:`tests.support.worker`).

    Attributes:
        gas: gradient accumulation steps (micro-batches per rank per step).
        bf16: DeepSpeed's bf16 mode.
        inverse_method: SP-NGD's ``inverse_method``.
        steps: optimizer steps to run.
        damping: SP-NGD's ``damping``.
        skip: SP-NGD's ``skip_modules`` (module names, e.g. "0", "3").
        fisher_type: SP-NGD's ``fisher_type``.
        zero: the ZeRO stage (at 3 every parameter is partitioned: ``stage3_param_persistence_threshold`` 0).
        sub_group_size: ZeRO 3's ``sub_group_size`` (elements per flat partition a step() call gets), when given.
        zero_init: build the model inside ``deepspeed.zero.Init`` (ZeRO 3): parameters partitioned as created.
        mode: SP-NGD's ``precondition_mode``.
        comm_dtype: SP-NGD's ``comm_dtype``.
        overlap: SP-NGD's ``overlap_comm``.
        bucket_cap_mb: SP-NGD's ``bucket_cap_mb``.
        kl_clip: SP-NGD's ``kl_clip``.
        weight_rescale: SP-NGD's ``weight_rescale``.
        inv_update_steps: SP-NGD's ``inv_update_steps``.
        nonfinite, max_consecutive_skips, stale_statistics, stale_tolerance, stale_max_interval, max_factor_dim,
            direction, async_inverse, async_inverse_delay: the SP-NGD options of those names, passed only when given
            (None: SP-NGD's default;
            ``max_factor_dim``: blocked sides, one owner per diagonal block).
        count_collectives: record every reduce / all_reduce / broadcast / all-gather / reduce-scatter per step.
        resume_at: save a checkpoint after that many steps, build a fresh engine, load it and continue.
        groups: two parameter groups (:func:`tests.support.worker.net.param_groups`); every rank then also records
            each parameter's momentum buffer after the last step.
        grad_accum_fp32: bf16 with fp32 gradient accumulation (DeepSpeed's BF16_Optimizer at ZeRO 1).
        omit: steps whose batch is drawn but never run (the reference a skipped step must equal).
        canary: plant a device slip (:func:`tests.support.worker.faults.device_slip`) for this case.
        meta: run the steps (and the checkpoint round trip) with ``torch.set_default_device("meta")``: every tensor
            the library creates without naming a device lands on "meta" and breaks the step.
        extra: an extra Linear(5, 5) on the logits: "never" (its hooks never fire), "rank0" (used on rank 0 only),
            "rank0_nograd" (as "rank0", and no gradient at all reaches it on the other ranks), "twice" (called twice
            on rank ``inject.rank`` at step ``inject.step``: contributions after its bucket left).
        inject: a fault on one rank (:class:`Inject`).
    """

    gas: int
    bf16: bool
    inverse_method: str
    steps: int
    damping: float = 0.03
    skip: tuple[str, ...] = ()
    fisher_type: str = "emp"
    zero: int = 0
    sub_group_size: int | None = None
    zero_init: bool = False
    mode: str = "comm_opt"
    comm_dtype: str = "fp32"
    overlap: bool = True
    bucket_cap_mb: float = 4.0
    kl_clip: float | None = None
    weight_rescale: bool = False
    inv_update_steps: int = 2
    nonfinite: str | None = None
    max_consecutive_skips: int | None = None
    stale_statistics: bool | None = None
    stale_tolerance: float | None = None
    stale_max_interval: int | None = None
    max_factor_dim: int | None = None
    direction: str | None = None
    async_inverse: bool | None = None
    async_inverse_delay: int | None = None
    count_collectives: bool = False
    resume_at: int | None = None
    groups: Groups | None = None
    grad_accum_fp32: bool = False
    omit: tuple[int, ...] = ()
    canary: bool = False
    meta: bool = False
    extra: Extra | None = None
    inject: Inject | None = None

    def optional_options(self) -> dict[str, Any]:
        """The SP-NGD options passed only when the case gives them."""
        keys = ("nonfinite", "max_consecutive_skips", "stale_statistics", "stale_tolerance", "stale_max_interval",
                "max_factor_dim", "direction", "async_inverse", "async_inverse_delay")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def fault(self, rank: int, step: int, kind: str) -> bool:
        """True when an ``inject`` of ``kind`` is active on ``rank`` at ``step``."""
        return self.inject is not None and self.inject.kind == kind and self.inject.active(rank, step)


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type (ints count as floats, bools as neither)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return value in args
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(hint, type) and isinstance(value, hint)


def _parse(cls: type[Any], raw: Any, where: str) -> dict[str, Any]:
    """Check ``raw`` against dataclass ``cls``'s fields; the keyword arguments that build it."""
    if not isinstance(raw, dict):
        raise CaseError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise CaseError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    missing = sorted(n for n, f in fields.items() if n not in raw and f.default is dataclasses.MISSING)
    if missing:
        raise CaseError(f"{where}: missing required key(s) {missing}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "inject" and value is not None:
            kwargs[name] = Inject(**_parse(Inject, value, f"{where}.inject"))
            continue
        if not _matches(value, hints[name]):
            raise CaseError(f"{where}: {name}={value!r} is not a {hints[name]}")
        kwargs[name] = tuple(value) if isinstance(value, list) else value
    return kwargs


def parse_case(raw: Any, where: str = "case") -> Case:
    """A :class:`Case` from its JSON object.

    Raises:
        CaseError: an unknown or missing key, or a value of the wrong type.
    """
    return Case(**_parse(Case, raw, where))


def parse_cases(raw: Any) -> list[Case]:
    """Every case of the worker's CASES_JSON list (checked before any rank runs one)."""
    if not isinstance(raw, list):
        raise CaseError(f"CASES_JSON: expected a JSON list, got {type(raw).__name__}")
    return [parse_case(c, f"case {i}") for i, c in enumerate(raw)]
