"""What a rank records: per step (:func:`record_step`), on an error (:func:`record_error`), after the last step
(:func:`record_final`), and the collectives it issued (:func:`count_collectives`).

Every rank writes its :class:`RankRecord` (less ``history``) to OUT/<case index>.r<rank>.pt; rank 0 also writes
OUT/<case index>.pt from ``history`` and ``losses`` (see :mod:`tests.support.worker.__main__`).
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from typing import Any, TypedDict

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from ds_spngd import SPNGD
from tests.support.worker.case import Case
from tests.support.worker.engine import spngd_of
from tests.support.worker.net import param_groups

COLLECTIVES: list[tuple[str, int, int]] = []  # (name, numel, bytes) of each collective since the last record
COUNTED = ("reduce", "all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor")


class StepRecord(TypedDict):
    """A rank's per-step lists (one entry per step, an omitted step included) and its error.

    Attributes:
        history: the model's parameters (fp32, flattened) after each step; rank 0 saves them as OUT/<i>.pt "params".
        losses: the global mean loss (NaN for an omitted step); rank 0 saves them as OUT/<i>.pt "loss".
        stats: SP-NGD's ``last_stats``.
        params: this rank's parameters (as ``history``; kept in the per-rank record).
        grads_finite: whether its gradients were finite at each accumulation boundary (ZeRO stage 0 only).
        ds_skipped: DeepSpeed's ``skipped_steps``.
        lr: DeepSpeed's lr (first group).
        skipped: SP-NGD's ``skipped_steps``.
        intervals: SP-NGD's ``refresh_intervals()``.
        due: the blocks due for a refresh at the next step.
        collectives: (name, numel, bytes) of every counted collective of the step (``count_collectives``).
        error: the error a step raised, {"step", "type", "message", "time", "trace", "params"}; None if none.
    """

    history: list[torch.Tensor]
    losses: list[float]
    stats: list[dict[str, Any]]
    params: list[torch.Tensor]
    grads_finite: list[bool]
    ds_skipped: list[int]
    lr: list[float]
    skipped: list[int]
    intervals: list[dict[str, int]]
    due: list[list[Any]]
    collectives: list[list[tuple[str, int, int]]]
    error: dict[str, Any] | None


class RankRecord(StepRecord, total=False):
    """A rank's record of a case: the per-step lists and, after the run, ...

    Attributes:
        momentum: each parameter's momentum buffer by name (``groups`` cases that finished without an error).
        memory: SP-NGD's ``memory_usage()`` after the last step.
        plan: SP-NGD's ``memory_plan()``.
        owners: the owner rank of each block (``owner_plan.block_owners``).
        part_owners: "<block name>#<part>" → owner rank of every part.
    """

    momentum: dict[str, torch.Tensor]
    memory: dict[str, int]
    plan: dict[str, int]
    owners: list[int]
    part_owners: dict[str, int]


def new_record() -> RankRecord:
    """An empty record."""
    return {"history": [], "losses": [], "stats": [], "params": [], "grads_finite": [], "ds_skipped": [], "lr": [],
            "skipped": [], "intervals": [], "due": [], "collectives": [], "error": None}


def _flat_params(model: nn.Module) -> torch.Tensor:
    """The model's parameters, flattened (under ZeRO 3 gathered first: a collective every rank reaches)."""
    params = list(model.parameters())
    if any(hasattr(q, "ds_tensor") for q in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return torch.cat([q.detach().float().reshape(-1).clone() for q in params])
    return torch.cat([q.detach().float().reshape(-1) for q in params])


def record_step(out: RankRecord, engine: Any, model: nn.Module, loss: float) -> None:
    """Append the state after a step (or an omitted one) and move the counted collectives into the record."""
    spngd = spngd_of(engine)
    out["losses"].append(loss)
    flat = _flat_params(model)
    out["history"].append(flat)
    out["params"].append(flat.clone())
    out["stats"].append(dict(spngd.last_stats))
    out["ds_skipped"].append(int(engine.skipped_steps))
    out["lr"].append(float(engine.get_lr()[0]))
    out["skipped"].append(int(getattr(spngd, "skipped_steps", 0)))
    out["intervals"].append(spngd.refresh_intervals())
    out["due"].append(list(spngd.refresh.due))  # the next step's due set
    out["collectives"].append(list(COLLECTIVES))
    COLLECTIVES.clear()


def record_error(out: RankRecord, err: BaseException, step: int, model: nn.Module) -> None:
    """The error a step raised (every rank must stop the same way; the case stops there)."""
    out["error"] = {"step": step, "type": type(err).__name__, "message": str(err), "time": time.time(),
                    "trace": traceback.format_exc()[-3000:],
                    "params": _flat_params(model).cpu()}  # ZeRO 3: a gather every rank reaches (they failed alike)


def momentum(engine: Any, model: nn.Module, case: Case) -> dict[str, torch.Tensor]:
    """Each model parameter's momentum buffer by name (fp32, full shape; a collective under ZeRO: every rank calls),
    read with DeepSpeed's ``safe_get_full_optimizer_state`` under ZeRO 1/2/3."""
    if any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_tensor") for p in model.parameters()):  # ZeRO's fragments
        return {n: deepspeed.utils.safe_get_full_optimizer_state(p, "momentum_buffer").clone()
                for n, p in model.named_parameters()}
    assert case.groups is not None
    spngd = spngd_of(engine)
    names = {id(p): n for n, p in model.named_parameters()}
    model_order = [p for g in param_groups(model, case.groups) for p in g["params"]]
    opt_order = [q for g in spngd.param_groups for q in g["params"]]  # the same positions (bf16: fp32 clones)
    return {names[id(p)]: spngd.state[q]["momentum_buffer"].clone()
            for p, q in zip(model_order, opt_order, strict=True)}


def record_final(out: RankRecord, engine: Any, model: nn.Module, case: Case) -> None:
    """After the last step (or the error): momentum (``groups``), memory, memory plan and owners."""
    spngd: SPNGD = spngd_of(engine)
    if case.groups and out["error"] is None:
        out["momentum"] = momentum(engine, model, case)
    out["memory"] = spngd.memory_usage() if hasattr(spngd, "memory_usage") else {}
    out["plan"] = spngd.memory_plan() if hasattr(spngd, "memory_plan") else {}
    plan = spngd.owner_plan
    assert plan is not None, "SP-NGD has no owner plan yet"
    out["owners"] = list(plan.block_owners)
    out["part_owners"] = {f"{spngd.blocks[i].name}#{k}": plan.owners[j] for j, (i, k) in enumerate(plan.jobs)}


def count_collectives() -> None:
    """``count_collectives``: record every reduce / all_reduce / broadcast / all-gather / reduce-scatter this process
    issues (SP-NGD's and DeepSpeed's), so a test can check that every rank issued the same sequence per step and
    count the bytes. Wraps the ``torch.distributed`` functions once per process (the wrapper carries ``_counted``)."""
    for name in COUNTED:
        real = getattr(dist, name)
        if getattr(real, "_counted", False):
            continue
        setattr(dist, name, _counting(name, real))


def _counting(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
    def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        COLLECTIVES.append((name, int(tensor.numel()), int(tensor.numel() * tensor.element_size())))
        return real(tensor, *args, **kwargs)

    counted._counted = True  # type: ignore[attr-defined]
    return counted


def save_records(out: str, index: int, rank: int, record: RankRecord) -> None:
    """Write case ``index``'s records into directory ``out``: rank 0 OUT/<index>.pt ({"params": steps × P,
    "loss": steps, float64}) when a step was recorded, every rank OUT/<index>.r<rank>.pt (the record less
    ``history``)."""
    if rank == 0 and record["history"]:
        torch.save({"params": torch.stack(record["history"]),
                    "loss": torch.tensor(record["losses"], dtype=torch.float64)},
                   os.path.join(out, f"{index}.pt"))
    rest = {k: v for k, v in record.items() if k != "history"}
    torch.save(rest, os.path.join(out, f"{index}.r{rank}.pt"))
