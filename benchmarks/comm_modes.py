"""Bytes per step on the wire and step time of SP-NGD's three ``precondition_mode`` placements and of momentum SGD,
side by side in one run (ZeRO 0, DeepSpeed engines, gloo CPU ranks, one thread each).

Usage::

    python benchmarks/comm_modes.py [--model cnn4] [--micro-batch 128] [--ranks 2] [--windows 5] [--bf16]

Every rank builds four engines on the same model and data — DeepSpeed's SGD (``ds_configs/sgd.json``'s params),
SP-NGD ``comm_opt``, ``mem_opt`` and ``reduce_scatter`` (``ds_configs/spngd.json``'s params otherwise) — and times
windows of whole refresh/inversion periods (lcm of factor_update_steps and inv_update_steps steps, so a window holds
its share of refreshes and inversions), alternating the engines window by window to cancel machine drift. Every
``torch.distributed`` collective of the timed windows is logged (:mod:`ds_spngd.comm.wire`: SP-NGD's and
DeepSpeed's own), giving per step the payload handed to collectives and the bytes a rank sends under the ring model.
The table: median ms/step over windows (the slowest rank) and its ratio to SGD, payload and ring-model bytes per
step and their ratios to SGD's, and the factor payload per step (``factor_bytes``, amortized).
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

from ds_spngd.comm.wire import record_collectives
from ds_spngd_lab.models import build_model
from ds_spngd_lab.ranks import worker_or_launch

ENGINES = ("sgd", "comm_opt", "mem_opt", "reduce_scatter")


def ds_config(args: argparse.Namespace, kind: str, world: int) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_batch_size": args.micro_batch * world, "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1, "gradient_clipping": 0, "zero_optimization": {"stage": 0},
        "steps_per_print": 10**9,
    }
    if kind == "sgd":
        cfg["optimizer"] = {"type": "SGD", "params": json.loads(Path(args.sgd_config).read_text())["optimizer"]
                            ["params"]}
    else:
        params = json.loads(Path(args.config).read_text())["optimizer"]["params"]
        cfg["optimizer"] = {"type": "SPNGD", "params": {**params, "precondition_mode": kind}}
    if args.bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def worker(args: argparse.Namespace) -> None:
    import deepspeed

    import ds_spngd

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    runs: list[dict[str, Any]] = []
    period = 1
    for kind in ENGINES:
        torch.manual_seed(0)
        model = build_model(args.model, 10, 1)
        engine, _, _, _ = ds_spngd.initialize(model=model, model_parameters=model.parameters(),
                                              config=ds_config(args, kind, world))
        spngd = ds_spngd.get_spngd(engine)
        if spngd is not None:
            period = math.lcm(period, spngd.cfg.factor_update_steps, spngd.cfg.inv_update_steps)
        runs.append({"kind": kind, "engine": engine, "spngd": spngd, "times": [], "payload": [], "wire": [],
                     "factor": []})
    gen = torch.Generator().manual_seed(1000 + rank)
    data = [(torch.randn(args.micro_batch, 1, 28, 28, generator=gen),
             torch.randint(0, 10, (args.micro_batch,), generator=gen)) for _ in range(4)]

    def window(run: dict[str, Any], keep: bool) -> None:
        engine, spngd = run["engine"], run["spngd"]
        factor = 0.0
        with record_collectives() as log:
            t0 = time.perf_counter()
            for i in range(period):
                x, y = data[i % len(data)]
                loss = F.cross_entropy(engine(x.to(dtype)).float(), y)
                engine.backward(loss)
                engine.step()
                if spngd is not None:
                    factor += spngd.last_stats.get("factor_bytes", 0.0) if spngd.last_stats.get("refresh") else 0.0
            elapsed = time.perf_counter() - t0
        if keep:
            run["times"].append(elapsed / period)
            run["payload"].append(log.payload_bytes() / period)
            run["wire"].append(log.wire_bytes() / period)
            run["factor"].append(factor / period)

    for _ in range(args.warmup):
        for run in runs:
            window(run, keep=False)
    for _ in range(args.windows):
        for run in runs:
            window(run, keep=True)
    out = {run["kind"]: {k: run[k] for k in ("times", "payload", "wire", "factor")} for run in runs}
    out["period"] = period  # type: ignore[assignment]
    Path(args.worker, f"rank{rank}.json").write_text(json.dumps(out))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def report(args: argparse.Namespace, ranks: list[dict[str, Any]]) -> None:
    period = ranks[0]["period"]
    print(f"{args.model}, {args.ranks} CPU ranks (gloo, 1 thread each), micro-batch {args.micro_batch}/rank"
          f"{', bf16' if args.bf16 else ''}, ZeRO 0, {args.config}; windows of {period} steps, {args.windows} per "
          "engine, interleaved")
    print("| engine | ms/step (median) | × SGD | payload KiB/step | × SGD | ring-model KiB sent/step | × SGD | "
          "factor payload KiB/step |")
    print("|---|---|---|---|---|---|---|---|")
    base: dict[str, float] = {}
    for kind in ENGINES:
        t = max(statistics.median(r[kind]["times"]) for r in ranks)
        payload = statistics.median(ranks[0][kind]["payload"])
        wire = statistics.median(ranks[0][kind]["wire"])
        factor = statistics.median(ranks[0][kind]["factor"])
        if kind == "sgd":
            base = {"t": t, "payload": payload, "wire": wire}
        print(f"| {kind} | {1e3 * t:.1f} | {t / base['t']:.2f} | {payload / 1024:.0f} | "
              f"{payload / base['payload']:.2f} | {wire / 1024:.0f} | {wire / base['wire']:.2f} | "
              f"{factor / 1024:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="ds_configs/spngd.json", help="source of the SP-NGD optimizer params")
    ap.add_argument("--sgd-config", default="ds_configs/sgd.json", help="source of the SGD optimizer params")
    ap.add_argument("--model", default="cnn4")
    ap.add_argument("--micro-batch", type=int, default=128, help="examples per rank and step")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--windows", type=int, default=5, help="measured windows per engine")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured windows per engine")
    ap.add_argument("--bf16", action="store_true", help="DeepSpeed bf16 for every engine")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    worker_or_launch(ap.parse_args(), __file__, worker, report)


if __name__ == "__main__":
    main()
