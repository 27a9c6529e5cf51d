"""Where one training step's time goes: SP-NGD vs AdamW and momentum SGD on the LM race model, phase by phase.

Usage (from the repository root, inside the virtualenv)::

    python benchmarks/step_phases.py [--vocabs 85 8192] [--windows 8] [--warmup 1] [--ranks 2]
        [--optimizers sgd adamw spngd spngd_async] [--spngd-config JSON] [--adamw-config JSON] [--json OUT.json]
        [--profile N]

The model is train_lm.py's plain GPT (:mod:`ds_spngd_lab.models.gpt`: 4 layers × 128, 4 heads, RMSNorm, tied
``lm_head``, context 64) for each ``--vocabs`` size (85: the char-level vocabulary; 8192: the BPE one) on random token
windows (fixed seeds, different per rank), global batch 32 on ``--ranks`` gloo CPU ranks (one thread each, launched by
:func:`ds_spngd_lab.ranks.launch_ranks`), ZeRO-2 + bf16 as ``ds_configs/spngd_gpt.json`` / ``adamw_gpt.json``
(decay / no-decay groups as train_lm.py builds them). The JSONs' LR schedulers are dropped (constant LR). ``sgd`` is
torch's momentum SGD with the SP-NGD JSON's lr and momentum (SP-NGD's update without the curvature). Every
(vocabulary, optimizer) engine lives in each rank; they are stepped in windows of one refresh period (the lcm of
``factor_update_steps`` and ``inv_update_steps``: 3 steps, one of which refreshes the factors and inverts), in a
rotating order, so machine drift hits them alike.

Phases of a step (seconds on each rank, averaged over the ranks):

* forward / backward: ``engine(x)`` + the loss, and ``engine.backward`` (ZeRO-2's gradient reduction included), less
  SP-NGD's hook time spent inside them;
* hooks: the factor capture in the module hooks (``CaptureContext.factor_seconds``), less the bucket launches they
  trigger;
* factor comm: packing and launching the factor buckets plus the wait on them (``comm_launch_s + comm_wait_s``);
* inversion: ``inversion_s``; precondition: ``precondition_s``, of which ``grad gather`` is the all-reduce that
  rebuilds the blocks' full gradients from the ZeRO partitions;
* update: the rest of the optimizer's ``step()`` calls (SP-NGD: the agreement all-reduce — shown as ``agreement`` —,
  the factor commit, momentum and the parameter update; AdamW / SGD: their whole step);
* DeepSpeed: ``engine.step`` less the optimizer's ``step()`` calls (ZeRO's gradient partition set-up, norm and
  clipping, the bf16 copies and the all-gather of the partitions).

Printed: one markdown table per vocabulary, ms per phase, medians over the windows of SP-NGD's plain steps, refresh
steps and the window mean (amortized), with the ratio to AdamW (for a phase AdamW does not have: ``+r``, the phase
in units of AdamW's whole step), and the spread of the totals (min–max over windows). ``--profile N`` also
cProfiles N plain SP-NGD steps of the first vocabulary on rank 0 and prints its top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ds_spngd_lab.ranks import worker_or_launch

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, CONTEXT, N_LAYER, N_HEAD, N_EMBD = 32, 64, 4, 4, 128
PHASES = ("forward", "backward", "hooks", "factor comm", "inversion", "precondition", "update", "DeepSpeed")
DETAIL = {"precondition": "grad gather", "update": "agreement"}  # sub-rows (part of the phase above them)
KINDS = ("plain", "refresh", "amortized")
LABELS = {"spngd": "SP-NGD", "spngd_async": "SP-NGD async"}  # column heads of the SP-NGD variants
CONFIGS: dict[str, str | Path] = {"spngd": ROOT / "ds_configs" / "spngd_gpt.json",
                                  "adamw": ROOT / "ds_configs" / "adamw_gpt.json"}


@dataclass
class Run:
    """One engine and what its steps measured."""

    key: str
    vocab: int
    engine: Any
    spngd: Any
    period: int
    clock: dict[str, float] = field(default_factory=lambda: {"opt": 0.0, "gather": 0.0})
    windows: list[list[dict[str, float]]] = field(default_factory=list)


def read_config(name: str) -> dict[str, Any]:
    """The JSON behind optimizer ``name`` (SGD: SP-NGD's, for its lr and momentum; ``spngd_async``: SP-NGD's with
    ``async_inverse`` on, installed ``inv_update_steps`` after launch)."""
    cfg: dict[str, Any] = json.loads(Path(CONFIGS["spngd" if name in ("sgd", "spngd_async") else name]).read_text())
    if name == "spngd_async":
        cfg["optimizer"]["params"]["async_inverse"] = True
    return cfg


def ds_config(name: str, world: int) -> dict[str, Any]:
    """The JSON of optimizer ``name`` with the benchmark's batch layout and no LR scheduler (SGD: no optimizer
    section; its optimizer is passed as an object)."""
    cfg = read_config(name)
    cfg.pop("scheduler", None)
    cfg.update(train_batch_size=GLOBAL_BATCH, train_micro_batch_size_per_gpu=GLOBAL_BATCH // world,
               gradient_accumulation_steps=1)
    if name == "sgd":
        cfg.pop("optimizer")
        cfg["zero_allow_untested_optimizer"] = True  # a client torch.optim.SGD under ZeRO-2
    return cfg


def build(name: str, vocab: int, world: int) -> Run:
    """The engine of optimizer ``name`` on a fresh GPT (seed 0), instrumented (:func:`instrument`)."""
    import ds_spngd
    from ds_spngd_lab.models.gpt import build_lm, param_groups

    torch.manual_seed(0)
    model = build_lm("gpt", vocab, N_LAYER, N_HEAD, N_EMBD, CONTEXT, 0.0, "rms")
    cfg = ds_config(name, world)
    opt_params = read_config(name)["optimizer"]["params"]
    groups: Any = list(model.parameters()) if opt_params.get("weight_decay") in (0, 0.0) else param_groups(model)
    client = None
    if name == "sgd":
        client = torch.optim.SGD(groups, lr=opt_params["lr"], momentum=opt_params["momentum"])
        groups = None
    engine, _, _, _ = ds_spngd.initialize(model=model, model_parameters=groups, optimizer=client, config=cfg)
    spngd = ds_spngd.get_spngd(engine)
    period = 3 if spngd is None else math.lcm(spngd.cfg.factor_update_steps, spngd.cfg.inv_update_steps)
    run = Run(f"{name}/{vocab}", vocab, engine, spngd, period)
    instrument(run)
    return run


def instrument(run: Run) -> None:
    """Sum the wall time of the optimizer's ``step()`` calls (torch step hooks on the innermost optimizer) and, for
    SP-NGD, of the gradient gather (a wrapper on its gradient access's ``block_grads``)."""
    base = run.spngd if run.spngd is not None else run.engine.optimizer.optimizer
    started: list[float] = []
    base.register_step_pre_hook(lambda *_: started.append(time.perf_counter()))

    def stop(*_: Any) -> None:
        run.clock["opt"] += time.perf_counter() - started.pop()

    base.register_step_post_hook(stop)
    if run.spngd is None:
        return
    gather = run.spngd.grads.block_grads

    def timed_gather(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return gather(*a, **k)
        finally:
            run.clock["gather"] += time.perf_counter() - t0

    run.spngd.grads.block_grads = timed_gather


def hook_seconds(run: Run) -> tuple[float, float]:
    """(SP-NGD's hook seconds so far this step, bucket launch seconds so far) — zeros for the baselines."""
    if run.spngd is None:
        return 0.0, 0.0
    return run.spngd.ctx.factor_seconds, run.spngd.reducer.launch_seconds


def timed_step(run: Run, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """One training step (forward, backward, engine.step) and its phases in seconds (module docstring)."""
    engine = run.engine
    run.clock.update(opt=0.0, gather=0.0)
    refresh = float(run.spngd is not None and run.spngd.ctx.collecting)
    h0, _ = hook_seconds(run)
    t0 = time.perf_counter()
    logits = engine(x)
    loss = F.cross_entropy(logits.float().reshape(-1, run.vocab), y.reshape(-1))
    t1 = time.perf_counter()
    h1, _ = hook_seconds(run)
    engine.backward(loss)
    t2 = time.perf_counter()
    h2, launched = hook_seconds(run)
    engine.step()
    t3 = time.perf_counter()
    st = run.spngd.last_stats if run.spngd is not None else {}
    comm = st.get("comm_launch_s", 0.0) + st.get("comm_wait_s", 0.0) if refresh else 0.0
    inv, pre = st.get("inversion_s", 0.0) if refresh else 0.0, st.get("precondition_s", 0.0)
    return {"refresh": refresh, "forward": (t1 - t0) - (h1 - h0), "backward": (t2 - t1) - (h2 - h1),
            "hooks": h2 - h0 - launched, "factor comm": comm, "inversion": inv, "precondition": pre,
            "grad gather": run.clock["gather"], "agreement": st.get("agree_s", 0.0),
            "update": run.clock["opt"] - (comm - launched) - inv - pre, "DeepSpeed": (t3 - t2) - run.clock["opt"],
            "total": t3 - t0}


def batches(vocab: int, rank: int, world: int, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` random (input, label) token windows of this rank's micro-batch."""
    gen = torch.Generator().manual_seed(1000 + rank)
    micro = GLOBAL_BATCH // world
    return [(torch.randint(0, vocab, (micro, CONTEXT), generator=gen),
             torch.randint(0, vocab, (micro, CONTEXT), generator=gen)) for _ in range(n)]


def profile_plain(run: Run, data: list[tuple[torch.Tensor, torch.Tensor]], steps: int, enabled: bool) -> str:
    """Step ``run`` until ``steps`` plain (non-refresh) SP-NGD steps are done, cProfiling those when ``enabled``
    (the other ranks step alongside, unprofiled, so the collectives match); the top functions by cumulative and by
    own time."""
    prof = cProfile.Profile()
    done = 0
    while done < steps:
        plain = not run.spngd.ctx.collecting
        if plain and enabled:
            prof.enable()
        timed_step(run, *data[done % len(data)])
        if plain and enabled:
            prof.disable()
        done += plain
    if not enabled:
        return ""
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).strip_dirs()
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(25)
    return out.getvalue()


def worker(args: argparse.Namespace) -> None:
    """One rank: build every engine, step them in rotating windows, write ``rank<r>.json``."""
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    CONFIGS.update(spngd=args.spngd_config, adamw=args.adamw_config)
    runs = [build(name, vocab, world) for vocab in args.vocabs for name in args.optimizers]
    data = {v: batches(v, rank, world) for v in args.vocabs}
    for w in range(args.warmup + args.windows):
        for j in range(len(runs)):
            run = runs[(w + j) % len(runs)]
            steps = [timed_step(run, *data[run.vocab][(w * run.period + i) % 4]) for i in range(run.period)]
            if w >= args.warmup:
                run.windows.append(steps)
    spngd = [r for r in runs if r.spngd is not None]
    profile = profile_plain(spngd[0], data[spngd[0].vocab], args.profile, rank == 0) if args.profile and spngd else ""
    out = {"runs": {r.key: r.windows for r in runs}, "profile": profile}
    Path(args.worker, f"rank{rank}.json").write_text(json.dumps(out))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# ---- report ---------------------------------------------------------------------------------------------------
def window_values(ranks: list[list[list[dict[str, float]]]]) -> dict[str, list[dict[str, float]]]:
    """Per kind (plain, refresh, amortized), per window: each phase's mean over the window's steps of that kind
    and over the ranks (seconds)."""
    out: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}
    keys = [*PHASES, *DETAIL.values(), "total"]
    for w in range(len(ranks[0])):
        steps = [[r[w][i] for r in ranks] for i in range(len(ranks[0][w]))]  # step → ranks
        pick = {"plain": [s for s in steps if not s[0]["refresh"]], "refresh": [s for s in steps if s[0]["refresh"]],
                "amortized": steps}
        for kind, chosen in pick.items():
            if chosen:
                out[kind].append({k: statistics.fmean(r[k] for s in chosen for r in s) for k in keys})
    return out


def summarize(values: list[dict[str, float]]) -> dict[str, float]:
    """Median over windows per phase (ms), and the totals' min / max (ms)."""
    keys = values[0].keys()
    med = {k: 1e3 * statistics.median(v[k] for v in values) for k in keys}
    med["min"] = 1e3 * min(v["total"] for v in values)
    med["max"] = 1e3 * max(v["total"] for v in values)
    return med


def ratio(value: float, base: float, base_total: float) -> str:
    """× the baseline's phase, or ``+r`` in units of its whole step when it has no such phase."""
    if base > 1e-6:
        return f"{value / base:.2f}×"
    return f"+{value / base_total:.2f}" if value > 1e-6 else "—"


def table(vocab: int, runs: dict[str, dict[str, dict[str, float]]]) -> str:
    """The markdown table of one vocabulary (``runs``: optimizer → kind → :func:`summarize`)."""
    adam = runs["adamw"]["amortized"] if "adamw" in runs else None
    cols: list[tuple[str, str]] = [(n, "amortized") for n in ("sgd", "adamw") if n in runs]
    cols += [(n, k) for n in ("spngd", "spngd_async") for k in KINDS if k in runs.get(n, {})]
    head, cells = [], {}
    rows = [r for p in PHASES for r in (p, DETAIL.get(p)) if r is not None] + ["total"]
    for n, k in cols:
        s = runs[n][k]
        head.append(f"{LABELS[n] + ' ' + k if n in LABELS else n} ms")
        cells[head[-1]] = [f"{s[r]:.1f}" for r in rows] + [f"{s['min']:.0f}–{s['max']:.0f}"]
        if adam is not None and n != "adamw":
            head.append("×AdamW")
            cells[head[-1] + n + k] = [ratio(s[r], adam[r], adam["total"]) for r in rows] + [""]
    keys = list(cells)
    labels = [f"  of which {r}" if r in DETAIL.values() else r for r in rows] + ["total min–max"]
    lines = [f"**vocab {vocab}**", "", "| phase | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    lines += ["| " + " | ".join([label] + [cells[k][i] for k in keys]) + " |" for i, label in enumerate(labels)]
    return "\n".join(lines)


def report(args: argparse.Namespace, ranks: list[dict[str, Any]]) -> None:
    """Print the tables (and the profile), and write ``--json``."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for key in ranks[0]["runs"]:
        kinds = window_values([r["runs"][key] for r in ranks])
        summary[key] = {k: summarize(v) for k, v in kinds.items() if v}
    first = ranks[0]["runs"][next(iter(ranks[0]["runs"]))]
    windows = len(first)
    period = max(len(w) for runs in ranks[0]["runs"].values() for w in runs)
    print(f"GPT {N_LAYER}x{N_EMBD}, context {CONTEXT}, global batch {GLOBAL_BATCH} on {args.ranks} gloo CPU ranks "
          f"(1 thread each), ZeRO-2 + bf16; medians over {windows} windows of up to {period} steps (one refresh "
          "period of SP-NGD; ms per step, mean over ranks)")
    for vocab in args.vocabs:
        print()
        print(table(vocab, {n: summary[f"{n}/{vocab}"] for n in args.optimizers}))
    if ranks[0]["profile"]:
        print("\ncProfile of plain SP-NGD steps (rank 0):\n" + ranks[0]["profile"])
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "summary": summary,
                                               "windows": [r["runs"] for r in ranks]}, indent=1))


def main(argv: list[str] | None = None) -> None:
    """Parse the command line; launch the ranks (or be one)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocabs", type=int, nargs="+", default=[85, 8192])
    ap.add_argument("--optimizers", nargs="+", default=["sgd", "adamw", "spngd"],
                    choices=("sgd", "adamw", "spngd", "spngd_async"))
    ap.add_argument("--spngd-config", default=str(CONFIGS["spngd"]), help="SP-NGD's JSON (SGD takes its lr, momentum)")
    ap.add_argument("--adamw-config", default=str(CONFIGS["adamw"]))
    ap.add_argument("--windows", type=int, default=8, help="measured windows (one refresh period each) per engine")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured windows per engine")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--profile", type=int, default=0, help="cProfile this many plain SP-NGD steps on rank 0")
    ap.add_argument("--json", default=None, help="write the summary and every window here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    worker_or_launch(ap.parse_args(argv), __file__, worker, report)


if __name__ == "__main__":
    main()
