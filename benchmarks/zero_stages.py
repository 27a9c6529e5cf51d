"""SP-NGD under ZeRO stages 0, 1 and 2: step time, optimizer-side memory per rank and gradient traffic, side by side.

Usage (from the repository root, inside the virtualenv):
    python benchmarks/zero_stages.py [--steps 30] [--warmup 10] [--micro-batch 128] [--ranks 2] [--bf16]

cnn4 on random MNIST-shaped data (fixed seeds), SP-NGD hyperparameters from ``--config`` (default ds_configs/spngd.json:
factors and inverses refreshed every 10 steps). Every (precision, precondition_mode, ZeRO stage) engine is built in
each of ``--ranks`` CPU ranks (gloo, one thread each, spawned as subprocesses of this script) and they are stepped in
alternating windows of one refresh period, so machine drift hits them alike.

* step time: forward + backward + engine.step, averaged over each window (amortizing its refresh/inversion step);
  median over windows, max over ranks; ratio vs stage 0 of the same precision and mode.
* memory per rank (max over ranks), bytes of distinct tensor storages: ``opt state`` = the inner optimizer's state
  (momentum buffers); ``params`` = the tensors in SP-NGD's param_groups (fp32 master copies or ZeRO partitions; at
  fp32 stage 0 these are the model's own weights); ``grads`` = their ``.grad`` plus live model ``.grad`` at SP-NGD's
  step; ``blk grads`` = the full block gradients SP-NGD rebuilds from ZeRO fragments (transient); ``factors`` = factor
  values held here (owners only); ``precond`` = preconditioner tensors held here (all ranks with comm_opt, owners with
  mem_opt). DeepSpeed's internal reduction buckets are not counted.
* traffic per step (max over ranks): SP-NGD's gradient/direction collectives (precondition_bytes, median) and the
  preconditioner broadcasts (inverse_bytes, averaged over all steps); ``ref`` = the model's fp32 gradient bytes, what
  DeepSpeed's own data-parallel all-reduce carries at stage 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ds_spngd_lab.models import build_model
from ds_spngd_lab.ranks import worker_or_launch

STAGES = (0, 1, 2)
MODES = ("comm_opt", "mem_opt")
MEM_KEYS = ("opt state", "params", "grads", "blk grads", "factors", "precond")
KIB = 1024.0


def configs(bf16: bool) -> list[tuple[str, str, int]]:
    precisions = ["fp32", "bf16"] if bf16 else ["fp32"]
    return [(p, m, s) for p in precisions for m in MODES for s in STAGES]


def ds_config(args: argparse.Namespace, precision: str, mode: str, stage: int, world: int) -> dict[str, Any]:
    base = json.loads(Path(args.config).read_text())
    params = {**base["optimizer"]["params"], "precondition_mode": mode}
    cfg: dict[str, Any] = {
        "train_batch_size": args.micro_batch * world, "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1, "gradient_clipping": 0, "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9, "optimizer": {"type": "SPNGD", "params": params},
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"buffer_dtype": "bf16"}  # BatchNorm buffers in bf16 too (ds_configs/spngd_bf16.json)
    return cfg


def storage_bytes(tensors: list[Tensor], seen: set[int]) -> int:
    """Bytes of the distinct storages behind ``tensors`` not already in ``seen`` (which is updated)."""
    total = 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def worker(args: argparse.Namespace) -> None:
    import deepspeed

    import ds_spngd

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    runs: list[dict[str, Any]] = []
    for precision, mode, stage in configs(args.bf16):
        torch.manual_seed(0)
        model = build_model("cnn4", 10, 1)
        cfg = ds_config(args, precision, mode, stage, world)
        engine, _, _, _ = ds_spngd.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        spngd = ds_spngd.get_spngd(engine)
        assert spngd is not None
        run: dict[str, Any] = {"engine": engine, "spngd": spngd, "model": model, "key": f"{precision}/{mode}/{stage}",
                               "dtype": torch.bfloat16 if precision == "bf16" else torch.float32,
                               "mem": dict.fromkeys(MEM_KEYS, 0), "times": [], "stats": []}
        period = math.lcm(spngd.cfg.factor_update_steps, spngd.cfg.inv_update_steps)
        instrument(run)
        runs.append(run)
    gen = torch.Generator().manual_seed(1000 + rank)
    data = [(torch.randn(args.micro_batch, 1, 28, 28, generator=gen),
             torch.randint(0, 10, (args.micro_batch,), generator=gen)) for _ in range(4)]

    def window(run: dict[str, Any], keep: bool) -> None:
        engine, times = run["engine"], []
        for i in range(period):
            x, y = data[i % len(data)]
            t0 = time.perf_counter()
            loss = F.cross_entropy(engine(x.to(run["dtype"])).float(), y)
            engine.backward(loss)
            engine.step()
            times.append(time.perf_counter() - t0)
            if keep:
                run["stats"].append(dict(run["spngd"].last_stats))
        if keep:
            run["times"].append(statistics.fmean(times))

    for _ in range(max(1, -(-args.warmup // period))):
        for run in runs:
            window(run, keep=False)
    for _ in range(max(1, -(-args.steps // period))):
        for run in runs:
            window(run, keep=True)
    out = {}
    for run in runs:
        spngd, mem = run["spngd"], run["mem"]
        seen: set[int] = set()
        mem["opt state"] = storage_bytes([v for st in spngd.state.values() for v in st.values()
                                          if isinstance(v, Tensor)], seen)
        mem["factors"] = storage_bytes([f.value for b in spngd.blocks for f in b.factors if f.value is not None], seen)
        mem["precond"] = storage_bytes([t for b in spngd.blocks if b.holds_preconditioner
                                        for t in b.preconditioner_tensors()], seen)
        out[run["key"]] = {"times": run["times"], "mem": mem, "stats": run["stats"],
                           "grad_ref": sum(p.numel() * 4 for p in run["model"].parameters())}
    Path(args.worker, f"rank{rank}.json").write_text(json.dumps(out))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def instrument(run: dict[str, Any]) -> None:
    """Record, inside SP-NGD's step, the bytes of its parameters and gradients and of the rebuilt block gradients."""
    spngd, model, mem = run["spngd"], run["model"], run["mem"]
    step, block_grads = spngd.step, spngd.grads.block_grads

    def counted_step(*a: Any, **k: Any) -> Any:
        seen: set[int] = set()
        params = [p for g in spngd.param_groups for p in g["params"]]
        mem["params"] = max(mem["params"], storage_bytes(params, seen))
        grads = [p.grad for p in [*params, *model.parameters()] if p.grad is not None]
        mem["grads"] = max(mem["grads"], storage_bytes(grads, seen))
        run["seen"] = seen
        return step(*a, **k)

    def counted_block_grads(*a: Any, **k: Any) -> Any:
        out, sent = block_grads(*a, **k)
        fresh = storage_bytes([g for gs in out.values() for g in gs], set(run.get("seen", ())))
        mem["blk grads"] = max(mem["blk grads"], fresh)
        return out, sent

    spngd.step = counted_step
    spngd.grads.block_grads = counted_block_grads


def report(args: argparse.Namespace, ranks: list[dict[str, Any]]) -> None:
    print(f"cnn4, {args.ranks} CPU ranks (gloo, 1 thread each), micro-batch {args.micro_batch}/rank, {args.config}; "
          f"{len(ranks[0][next(iter(ranks[0]))]['times'])} measured windows per config; memory in KiB per rank")
    print(f"{'precision/mode/stage':<21} {'ms/step':>7} {'×st0':>5} " + " ".join(f"{k:>9}" for k in MEM_KEYS)
          + f" {'total':>8} {'×st0':>5} {'grad bytes/step':>15} {'×ref':>5} {'inv bytes/step':>14}")
    rows: dict[str, tuple[float, float]] = {}
    for key in ranks[0]:
        per = [r[key] for r in ranks]
        t = max(statistics.median(p["times"]) for p in per)
        mem = {k: max(p["mem"][k] for p in per) for k in MEM_KEYS}
        total = float(max(sum(p["mem"].values()) for p in per))
        rows[key] = (t, total)
        base_t, base_mem = rows[key.rsplit("/", 1)[0] + "/0"]
        sent = max(statistics.median(s.get("precondition_bytes", 0.0) for s in p["stats"]) for p in per)
        inv = max(statistics.fmean(s.get("inverse_bytes", 0.0) for s in p["stats"]) for p in per)
        ref = per[0]["grad_ref"]
        print(f"{key:<21} {1e3 * t:>7.1f} {t / base_t:>5.2f} " + " ".join(f"{mem[k] / KIB:>9.1f}" for k in MEM_KEYS)
              + f" {total / KIB:>8.1f} {total / base_mem:>5.2f} {sent:>15.0f} {sent / ref:>5.2f} {inv:>14.0f}")
    print(f"ref = {ranks[0][next(iter(ranks[0]))]['grad_ref']} bytes (model fp32 gradient)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="ds_configs/spngd.json", help="source of the SP-NGD optimizer params")
    ap.add_argument("--steps", type=int, default=30, help="measured steps per config (rounded up to whole periods)")
    ap.add_argument("--warmup", type=int, default=10, help="unmeasured steps per config (whole periods, ≥ 1)")
    ap.add_argument("--micro-batch", type=int, default=128, help="examples per rank and step")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="also run every configuration with DeepSpeed bf16")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    worker_or_launch(ap.parse_args(), __file__, worker, report)


if __name__ == "__main__":
    main()
