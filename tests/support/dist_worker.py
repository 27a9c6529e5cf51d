"""One data-parallel rank of a tiny SP-NGD run through the real DeepSpeed engine (used by test_distributed.py,
test_device_and_faults.py).

Run as: RANK=r WORLD_SIZE=w LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/support/dist_worker.py OUT CASES_JSON
Each case is {"gas": int, "bf16": bool, "inverse_method": str, "steps": int} plus optional "damping", "skip",
"fisher_type", "zero" (stage), "mode" (precondition_mode), "comm_dtype", "overlap", "bucket_cap_mb", "kl_clip",
"weight_rescale", "nonfinite", "max_consecutive_skips", "inv_update_steps", "stale_statistics", "stale_tolerance",
"stale_max_interval", "max_factor_dim" (blocked sides: one owner per diagonal block), "count_collectives"
(record every reduce / all_reduce / broadcast per step), "resume_at"
(save a checkpoint after that many steps, build a fresh engine, load it and continue),
"groups" (two parameter groups, see
:func:`param_groups`; every rank then also records each parameter's momentum buffer after the last step, read with
DeepSpeed's ``safe_get_full_optimizer_state`` under ZeRO), "grad_accum_fp32" (bf16 with fp32 gradient accumulation:
DeepSpeed's BF16_Optimizer at ZeRO 1), and for the device and fault tests:

* "omit": steps whose batch is drawn but never run (the reference a skipped step must equal);
* "canary": plant a device slip (:func:`_plant_device_slip`) for this case;
* "meta": run the steps (and the checkpoint round trip) with ``torch.set_default_device("meta")``: every tensor the
  library creates without naming a device lands on "meta" and breaks the step (a device slip, caught on CPU);
* "extra": "never" (an extra Linear whose hooks never fire), "rank0" (used on rank 0 only: its hooks fire on one
  rank), "rank0_nograd" (as "rank0", and no gradient at all reaches it on the other ranks), "twice" (called twice
  on rank ``inject.rank`` at step ``inject.step``: contributions after its bucket left);
* "inject": {"kind": "factor" | "grad" | "inversion" | "inversion_nan", "rank": r, "step": s, "steps": n}: on rank
  r, from step s for n steps (default 1): scale that rank's micro-batch by 1e19 (its factor statistics overflow,
  the gradients stay finite: LayerNorm follows fc1), multiply one parameter's gradient by Inf before DeepSpeed's
  reduction, make the owner's preconditioner draft raise a LinAlgError, or make it return NaN.

The global batch of every step is fixed (seeded); rank r takes the r-th contiguous share and splits it into gas
micro-batches. Rank 0 saves, per step, the model's parameters (fp32 view) and the global mean loss to
OUT/<case index>.pt as {"params": steps × P, "loss": steps}; every rank writes OUT/<i>.r<rank>.pt with its SP-NGD
stats, its own parameters per step ("params"), whether its gradients were finite before each step (stage 0),
DeepSpeed's skipped_steps and lr per step, SP-NGD's skipped_steps, memory_usage()/memory_plan() after the last
step, and the error a step raised ({"step", "type", "message", "time"}; the case stops there).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tests.support.harness import teardown
from torch import nn

import ds_spngd

GLOBAL_BATCH = 24


class Net(nn.Module):
    """Conv → ReLU → Linear → LayerNorm → ReLU → Linear, optionally with an extra Linear(5, 5) on the logits."""

    def __init__(self, extra: str | None = None, rank: int = 0, twice: tuple[int, int] = (-1, -1)) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16),
                                  nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 5))
        self.extra = nn.Linear(5, 5) if extra else None
        self.mode, self.rank, self.twice, self.step = extra, rank, twice, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.extra is None or self.mode == "never":
            return out
        if self.mode == "rank0" and self.rank != 0:
            return out + 0.0 * self.extra.weight.sum() + 0.0 * self.extra.bias.sum()  # a gradient, no hook
        if self.mode == "rank0_nograd" and self.rank != 0:
            return out  # no gradient at all on the other ranks (None until someone fills it)
        out = out + self.extra(out)
        if self.mode == "twice" and (self.rank, self.step) == self.twice:
            out = out + self.extra(out)
        return out


def make_model(case: dict | None = None, rank: int = 0) -> nn.Module:
    torch.manual_seed(0)
    case = case or {}
    inject = case.get("inject") or {}
    body = Net(case.get("extra"), rank, (inject.get("rank", -1), inject.get("step", -1)))
    if case.get("extra") is None:
        return body.body  # the plain Sequential (parameter names "0.weight", ... as before)
    return body


def param_groups(model: nn.Module, case: dict) -> list[dict]:
    """``case["groups"]``: "wd" — the transformers recipe: a decay group (Conv/Linear weights, weight_decay 0.1) and a
    no-decay group (their biases and the LayerNorm, weight_decay 0), so each block's weight and bias sit in different
    groups; "lr" — the same split with the no-decay group at its own lr 0.05 and momentum 0.5, the decay group at lr
    0.1 (no scheduler then: WarmupLR would set every group's lr alike)."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    if case["groups"] == "wd":
        return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return [{"params": decay, "weight_decay": 1e-3, "lr": 0.1},
            {"params": no_decay, "weight_decay": 0.0, "lr": 0.05, "momentum": 0.5}]


def _momentum(engine, model: nn.Module, case: dict) -> dict[str, torch.Tensor]:
    """Each model parameter's momentum buffer by name (fp32, full shape; a collective under ZeRO: every rank calls)."""
    if any(hasattr(p, "_hp_mapping") for p in model.parameters()):  # ZeRO 1/2: DeepSpeed's optimizer-state fragments
        return {n: deepspeed.utils.safe_get_full_optimizer_state(p, "momentum_buffer").clone()
                for n, p in model.named_parameters()}
    spngd = ds_spngd.get_spngd(engine)
    names = {id(p): n for n, p in model.named_parameters()}
    model_order = [p for g in param_groups(model, case) for p in g["params"]]
    opt_order = [q for g in spngd.param_groups for q in g["params"]]  # the same positions (bf16: fp32 clones)
    return {names[id(p)]: spngd.state[q]["momentum_buffer"].clone()
            for p, q in zip(model_order, opt_order, strict=True)}


def build(case: dict, world: int, rank: int = 0):
    gas = case["gas"]
    micro = GLOBAL_BATCH // (world * gas)
    config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "zero_optimization": {"stage": case.get("zero", 0)},
        "optimizer": {"type": "SPNGD", "params": {
            "lr": 0.2, "momentum": 0.9, "damping": case.get("damping", 0.03), "factor_decay": 0.5, "weight_decay": 1e-3,
            "factor_update_steps": 1, "inv_update_steps": case.get("inv_update_steps", 2),
            "inverse_method": case["inverse_method"],
            "fisher_type": case.get("fisher_type", "emp"), "skip_modules": case.get("skip", []),
            "precondition_mode": case.get("mode", "comm_opt"), "comm_dtype": case.get("comm_dtype", "fp32"),
            "overlap_comm": case.get("overlap", True), "bucket_cap_mb": case.get("bucket_cap_mb", 4.0),
            "kl_clip": case.get("kl_clip"), "weight_rescale": case.get("weight_rescale", False),
            **{k: case[k] for k in ("nonfinite", "max_consecutive_skips", "stale_statistics", "stale_tolerance",
                                    "stale_max_interval", "max_factor_dim") if k in case}}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.02, "warmup_max_lr": 0.2,
                                                      "warmup_num_steps": 4, "warmup_type": "linear"}},
    }
    if case["bf16"]:
        config["bf16"] = {"enabled": True}
    if case.get("grad_accum_fp32"):
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if case.get("groups") == "lr":
        del config["scheduler"]
    model = make_model(case, rank)
    params = param_groups(model, case) if case.get("groups") else model.parameters()
    engine, _, _, _ = ds_spngd.initialize(model=model, model_parameters=params, config=config)
    return engine, model


def _arm_inversion_fault(engine, case: dict, rank: int, step: int) -> None:
    """On the injected rank and step, make the drafts of the blocks it owns fail (raise, or return NaN)."""
    inject = case.get("inject") or {}
    if not str(inject.get("kind", "")).startswith("inversion"):
        return
    spngd = ds_spngd.get_spngd(engine)
    first, n = inject["step"], inject.get("steps", 1)
    active = rank == inject["rank"] and first <= step < first + n
    plan = spngd._owners
    for i, block in enumerate(spngd.blocks):
        block.__dict__.pop("draft_part", None)  # back to the class method
        if not active or rank not in {plan.owners[j] for j, (b, _) in enumerate(plan.jobs) if b == i}:
            continue
        real = block.draft_part

        def broken(k, damping, method, traces, real=real, kind=inject["kind"]):
            if kind == "inversion":
                raise torch.linalg.LinAlgError("injected: the solver did not converge")
            draft = real(k, damping, method, traces)
            build = draft.build
            draft.build = lambda: [t * float("nan") for t in build()]
            return draft

        block.draft_part = broken


def _plant_device_slip() -> object:
    """The canary of the default-device probe: the bug it exists for (a silent module's zero contribution created
    without naming a device, so it lands on the default device). Returns the original to restore."""
    from ds_spngd.curvature.factor import SymmetricFactor

    original = SymmetricFactor.take_local

    def take_local(self: SymmetricFactor) -> tuple[torch.Tensor, float]:
        if self.accum is None:
            self.accum = torch.zeros(self.blocks, self.dim, self.dim)  # no device: the slip
        return original(self)

    SymmetricFactor.take_local = take_local  # type: ignore[method-assign]
    return original


def _record(out: dict, engine, model: nn.Module, loss: float) -> None:
    spngd = ds_spngd.get_spngd(engine)
    out["losses"].append(loss)
    flat = torch.cat([q.detach().float().reshape(-1) for q in model.parameters()])
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


COLLECTIVES: list[tuple[str, int, int]] = []  # (name, numel, bytes) of each collective since the last record


def _count_collectives() -> None:
    """"count_collectives": record every reduce / all_reduce / broadcast / all-gather / reduce-scatter this process
    issues (SP-NGD's and DeepSpeed's), so a test can check that every rank issued the same sequence per step and
    count the bytes."""
    for name in ("reduce", "all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor"):
        real = getattr(dist, name)
        if getattr(real, "_counted", False):
            continue

        def counted(tensor, *args, _real=real, _name=name, **kwargs):
            COLLECTIVES.append((_name, int(tensor.numel()), int(tensor.numel() * tensor.element_size())))
            return _real(tensor, *args, **kwargs)

        counted._counted = True  # type: ignore[attr-defined]
        setattr(dist, name, counted)


def run_case(case: dict, rank: int, world: int) -> dict:
    gas = case["gas"]
    if case.get("canary"):
        from ds_spngd.curvature.factor import SymmetricFactor
        original = _plant_device_slip()
        try:
            return run_case({**case, "canary": False}, rank, world)
        finally:
            SymmetricFactor.take_local = original  # type: ignore[method-assign]
    if case.get("count_collectives"):
        _count_collectives()
    engine, model = build(case, world, rank)
    COLLECTIVES.clear()
    dtype = torch.bfloat16 if case["bf16"] else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(1)
    inject = case.get("inject") or {}
    out: dict = {"history": [], "losses": [], "stats": [], "params": [], "grads_finite": [], "ds_skipped": [],
                 "lr": [], "skipped": [], "intervals": [], "due": [], "collectives": [], "error": None}
    holder = [tempfile.mkdtemp(prefix="spngd_ckpt_") if rank == 0 else None]
    if case.get("resume_at") is not None:
        dist.broadcast_object_list(holder, src=0)
    probe = "meta" if case.get("meta") else "cpu"  # the default device while the library runs
    torch.set_default_device(probe)
    try:
        for step in range(case["steps"]):
            if step == case.get("resume_at"):
                engine.save_checkpoint(holder[0], tag="k")
                torch.set_default_device("cpu")  # the user's model is built on the CPU...
                engine, model = build(case, world, rank)  # a fresh engine, as after a restart
                torch.set_default_device(probe)  # ...and the library loads and steps under the probe
                engine.load_checkpoint(holder[0], tag="k")
            if hasattr(model, "step"):
                model.step = step
            _arm_inversion_fault(engine, case, rank, step)
            x = torch.randn(GLOBAL_BATCH, 1, 6, 6, generator=gen, device="cpu")
            y = torch.randint(0, 5, (GLOBAL_BATCH,), generator=gen, device="cpu")
            share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
            if step in case.get("omit", ()):  # the reference of a skipped step: this batch never happened
                _record(out, engine, model, float("nan"))
                continue
            active = rank == inject.get("rank") and inject.get("step", -1) <= step < inject.get("step", -1) + \
                inject.get("steps", 1)
            xs = x[share] * (1e19 if active and inject.get("kind") == "factor" else 1.0)
            handles = []
            if active and inject.get("kind") == "grad":
                p = next(iter(model.parameters()))
                handles.append(p.register_hook(lambda g: g * float("inf")))
            total = torch.zeros(1, device="cpu")
            for xm, ym in zip(xs.chunk(gas), y[share].chunk(gas), strict=True):
                loss = F.cross_entropy(engine(xm.to(dtype)).float(), ym)
                total += loss.detach() * ym.numel()
                engine.backward(loss)
                if case.get("zero", 0) == 0 and engine.is_gradient_accumulation_boundary():
                    out["grads_finite"].append(all(bool(torch.isfinite(q.grad).all()) for q in model.parameters()
                                                   if q.grad is not None))
                engine.step()
            for h in handles:
                h.remove()
            dist.all_reduce(total)
            _record(out, engine, model, float(total) / GLOBAL_BATCH)
    except Exception as err:  # noqa: BLE001 - recorded for the test: every rank must stop the same way
        out["error"] = {"step": step, "type": type(err).__name__, "message": str(err), "time": time.time(),
                        "trace": traceback.format_exc()[-3000:],
                        "params": torch.cat([q.detach().float().reshape(-1).cpu() for q in model.parameters()])}
    finally:
        torch.set_default_device("cpu")
    spngd = ds_spngd.get_spngd(engine)
    if case.get("groups") and out["error"] is None:
        out["momentum"] = _momentum(engine, model, case)
    out["memory"] = spngd.memory_usage() if hasattr(spngd, "memory_usage") else {}
    out["plan"] = spngd.memory_plan() if hasattr(spngd, "memory_plan") else {}
    out["owners"] = list(spngd._owners.block_owners)
    out["part_owners"] = {f"{spngd.blocks[i].name}#{k}": spngd._owners.owners[j]
                          for j, (i, k) in enumerate(spngd._owners.jobs)}
    return out


def main() -> None:
    out, cases = sys.argv[1], json.loads(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    for i, case in enumerate(cases):
        res = run_case(case, rank, world)
        if rank == 0 and res["history"]:
            torch.save({"params": torch.stack(res["history"]), "loss": torch.tensor(res["losses"],
                                                                                   dtype=torch.float64)},
                       os.path.join(out, f"{i}.pt"))
        res.pop("history")
        torch.save(res, os.path.join(out, f"{i}.r{rank}.pt"))
    teardown()  # barrier, destroy_process_group, exit without interpreter finalization (see tests/support/harness.py)


if __name__ == "__main__":
    main()
