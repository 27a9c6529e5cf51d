"""Runs of the language-model races (``benchmarks/lm_race.py``, ``benchmarks/lm_batch_scaling.py``): LR / warm-up
grids per DeepSpeed config, each run's generated JSON, one launch at a time through the deepspeed launcher, resumable.

**Sweep specs** (command line): ``CONFIG[@B]:KEY=V1,V2[:KEY=...]``, e.g. ``adamw_gpt:lr=3e-3,1e-2,2e-2`` or
``muon_gpt@128:lr=0.02,0.04:adam_lr=0.02``. Keys (:data:`KEYS`): ``lr`` (train_lm.py ``--lr``; for Muon it sets
``muon_lr``, the LR of the orthogonalized weights), ``adam_lr`` (``--adam-lr``: Muon's AdamW half) and ``warmup``
(``--warmup-steps``). A config's grid is the Cartesian product of its keys' values; ``@B`` restricts a spec to global
batch B (the batch-scaling driver).

**Each run** lives in ``<out>/<run_id>/``: ``ds_config.json`` (the shipped ``ds_configs/<config>.json`` with the run's
batch layout — ``train_batch_size`` B, a micro-batch of at most ``max_micro_batch`` sequences per rank and gradient
accumulation above that (:func:`ds_spngd_lab.sweep.grid.micro_layout`) — and, with ``noise_scale``, ZeRO stage 0 plus
the ``gradient_noise_scale`` section, since B_simple needs every rank's whole local gradient), ``command.json``,
``launcher.log`` and train_lm.py's ``result.json`` / ``steps.csv``. Every run gets the same ``--seed`` (same initial
weights, same batches), its own free master port, and its ``/dev/shm`` buffers are deleted when it ends
(:func:`ds_spngd_lab.ranks.run_launcher`).

**Resume rule**: a run whose ``result.json`` exists next to a ``command.json`` equal to the current one (train_lm.py
arguments, ranks, the generated JSON, the environment overrides) is reused, not rerun; otherwise a stale
``result.json`` is deleted and the run launched. A long race killed by a timeout is resumed by running the same
command again.

**Environment**: DeepSpeed's ``"type": "Muon"`` compiles its Newton-Schulz step with torch.compile, which on CPU
makes it crawl; runs of a Muon config get ``TORCHDYNAMO_DISABLE=1`` when CUDA is not available.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ds_spngd_lab.ranks import free_port, run_launcher
from ds_spngd_lab.sweep.grid import micro_layout
from ds_spngd_lab.sweep.runner import diverged

__all__ = ["CONTROLLED", "KEYS", "LABELS", "LMRun", "LaunchSettings", "SweepSpec", "command_record",
           "controlled_flags", "grid_points", "launch_env", "load_ds_config", "parse_spec", "reusable_result",
           "run_all", "run_ds_config", "train_args"]  # fmt: skip

ROOT = Path(__file__).resolve().parents[2]
KEYS: dict[str, str] = {"lr": "--lr", "adam_lr": "--adam-lr", "warmup": "--warmup-steps"}  # spec key -> train_lm flag
SHORT = {"lr": "lr", "adam_lr": "alr", "warmup": "wu"}
LABELS = {"adamw": "AdamW", "adam": "Adam", "muon": "Muon", "lamb": "LAMB", "lars": "LARS", "spngd": "SP-NGD",
          "sgd": "SGD"}  # fmt: skip
Point = tuple[tuple[str, float], ...]  # one grid point: (key, value) pairs in KEYS order


@dataclass(frozen=True)
class SweepSpec:
    """One ``--sweep`` spec: ``config`` (``ds_configs/<config>.json``), ``batch`` (None: any) and the values of each
    key of :data:`KEYS` it sweeps."""

    config: str
    batch: int | None
    axes: dict[str, tuple[float, ...]]


def parse_spec(spec: str) -> SweepSpec:
    """Parse ``CONFIG[@B]:KEY=V1,V2[:KEY=...]`` (see the module docstring).

    Raises:
        ValueError: no config, an unknown key, a repeated key, an empty or non-positive value list.
    """
    head, *parts = spec.split(":")
    config, _, batch = head.partition("@")
    if not config or (batch and not batch.isdigit()):
        raise ValueError(f"sweep spec {spec!r}: expected CONFIG[@B]:KEY=V1,V2[:KEY=...]")
    axes: dict[str, tuple[float, ...]] = {}
    for part in parts:
        key, eq, values = part.partition("=")
        if key not in KEYS or not eq:
            raise ValueError(f"sweep spec {spec!r}: {part!r} is not KEY=V1,V2 with KEY one of {list(KEYS)}")
        if key in axes:
            raise ValueError(f"sweep spec {spec!r}: key {key!r} given twice")
        try:
            vals = tuple(float(v) for v in values.split(","))
        except ValueError as exc:
            raise ValueError(f"sweep spec {spec!r}: {values!r} is not a list of numbers") from exc
        if any(v <= 0 for v in vals) or (key == "warmup" and any(v != int(v) for v in vals)):
            raise ValueError(f"sweep spec {spec!r}: {key} values must be positive (warmup: whole steps)")
        axes[key] = vals
    return SweepSpec(config, int(batch) if batch else None, axes)


def grid_points(axes: Mapping[str, Sequence[float]]) -> list[Point]:
    """Every point of the Cartesian product of ``axes`` (keys in :data:`KEYS` order); ``[()]`` for no axes."""
    keys = [k for k in KEYS if k in axes]
    return [tuple(zip(keys, vals, strict=True)) for vals in itertools.product(*(axes[k] for k in keys))]


@dataclass(frozen=True)
class LMRun:
    """One train_lm.py run: ``config`` (``ds_configs/<config>.json``), global ``batch``, ``steps`` (the LR schedule's
    length), ``eval_interval``, the grid ``point`` (overrides) and a ``prefix`` for its id and folder (e.g.
    ``b128/``)."""

    config: str
    batch: int
    steps: int
    eval_interval: int
    point: Point = ()
    prefix: str = ""

    @property
    def run_id(self) -> str:
        """``<prefix><config>`` plus each override, e.g. ``b128/muon_gpt_lr0.02_alr0.01``."""
        tags = "".join(f"_{SHORT[k]}{v:g}" for k, v in self.point)
        return f"{self.prefix}{self.config}{tags}"

    def override(self, key: str) -> float | None:
        """The point's value of ``key`` (None: not overridden)."""
        return dict(self.point).get(key)


@dataclass(frozen=True)
class LaunchSettings:
    """What every run shares: output folder, model, ranks, seed, per-run timeout, the largest micro-batch per rank,
    whether to measure the noise scale, an optional fixed ``--target-loss``, train_lm.py ``extra`` arguments."""

    out: Path
    model: str = "gpt"
    ranks: int = 2
    seed: int = 0
    timeout_s: float = 1800.0
    max_micro_batch: int = 64
    noise_scale: bool = False
    target_loss: float | None = None
    extra: tuple[str, ...] = field(default_factory=tuple)


def load_ds_config(config: str) -> dict[str, Any]:
    """The parsed ``ds_configs/<config>.json``."""
    return dict(json.loads((ROOT / "ds_configs" / f"{config}.json").read_text(encoding="utf-8")))


def optimizer_key(cfg: dict[str, Any]) -> str:
    """The JSON's ``optimizer.type`` in lower case (``"client"`` without one)."""
    return str((cfg.get("optimizer") or {}).get("type", "client")).lower()


def run_ds_config(raw: dict[str, Any], batch: int, ranks: int, max_micro_batch: int,
                  noise_scale: bool) -> dict[str, Any]:
    """The run's DeepSpeed JSON: ``raw`` (not modified) with the batch layout of ``batch`` on ``ranks`` (micro-batch
    at most ``max_micro_batch``) and, with ``noise_scale``, ZeRO stage 0 and ``gradient_noise_scale`` enabled."""
    cfg = copy.deepcopy(raw)
    micro, gas = micro_layout(batch, ranks, max_micro_batch)
    cfg.update(train_batch_size=batch, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=gas)
    if noise_scale:
        cfg["zero_optimization"] = {**(cfg.get("zero_optimization") or {}), "stage": 0}
        cfg["gradient_noise_scale"] = {"enabled": True, "ema": 0.95}
    return cfg


CONTROLLED = ("--deepspeed_config", "--model", "--global-batch", "--max-steps", "--epochs", "--eval-interval",
              "--seed", "--out-dir", "--target-loss", *KEYS.values())  # set per run by train_args


def controlled_flags(extra: Sequence[str]) -> list[str]:
    """The train_lm.py flags in ``extra`` that the harness sets itself (given again they would override the grid)."""
    return [a for a in extra if a.split("=", 1)[0] in CONTROLLED]


def add_launch_arguments(ap: argparse.ArgumentParser, out: str) -> None:
    """The options every LM driver (race, batch scaling) passes to :class:`LaunchSettings`."""
    ap.add_argument("--model", default="gpt", choices=("gpt", "hf-gpt2"))
    ap.add_argument("--max-micro-batch", type=int, default=64, help="largest micro-batch per rank")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run before it is killed")
    ap.add_argument("--out", default=out)


def resolve_configs(ap: argparse.ArgumentParser, args: argparse.Namespace, extra: Sequence[str], who: str) -> None:
    """Refuse train_lm.py flags the driver sets itself, parse ``args.sweep`` into ``args.specs``, append the specs'
    configs to ``args.configs`` and refuse configs without a ``ds_configs/<name>.json`` (``ap.error``)."""
    if controlled_flags(extra):
        ap.error(f"{who} sets {controlled_flags(extra)} itself (use --sweep / its own options)")
    try:
        args.specs = [parse_spec(spec) for spec in args.sweep]
    except ValueError as exc:
        ap.error(str(exc))
    args.configs = list(dict.fromkeys([*args.configs, *(spec.config for spec in args.specs)]))
    missing = [c for c in args.configs if not (ROOT / "ds_configs" / f"{c}.json").exists()]
    if missing:
        ap.error(f"no ds_configs/<name>.json for {missing}")


def train_args(run: LMRun, s: LaunchSettings, config_path: Path, out_dir: Path) -> list[str]:
    """train_lm.py and its arguments for ``run`` (the launcher and port come in front)."""
    args = ["train_lm.py", "--deepspeed_config", str(config_path), "--model", s.model, "--global-batch",
            str(run.batch), "--max-steps", str(run.steps), "--eval-interval", str(run.eval_interval), "--seed",
            str(s.seed), "--out-dir", str(out_dir)]  # fmt: skip
    if s.target_loss is not None:
        args += ["--target-loss", f"{s.target_loss:g}"]
    for key, value in run.point:
        args += [KEYS[key], str(int(value)) if key == "warmup" else f"{value:g}"]
    return [*args, *s.extra]


def launch_env(cfg: dict[str, Any], cuda: bool | None = None) -> dict[str, str]:
    """Environment overrides of a run: ``TORCHDYNAMO_DISABLE=1`` for a Muon config without CUDA (``cuda``: None asks
    torch)."""
    if optimizer_key(cfg) != "muon":
        return {}
    if cuda is None:
        import torch

        cuda = bool(torch.cuda.is_available())
    return {} if cuda else {"TORCHDYNAMO_DISABLE": "1"}


def command_record(args: Sequence[str], ranks: int, cfg: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """What decides whether an earlier result can be reused (``command.json``)."""
    return {"train_lm": list(args), "ranks": ranks, "ds_config": cfg, "env": dict(sorted(env.items()))}


def reusable_result(run_dir: Path, record: dict[str, Any]) -> dict[str, Any] | None:
    """The run's ``result.json`` when it exists and ``command.json`` equals ``record``; else None."""
    result, command = run_dir / "result.json", run_dir / "command.json"
    if not (result.exists() and command.exists()):
        return None
    try:
        if json.loads(command.read_text(encoding="utf-8")) != json.loads(json.dumps(record)):
            return None
        return dict(json.loads(result.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError):
        return None


def _launcher() -> list[str]:
    exe = Path(sys.executable).with_name("deepspeed")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]


def _peak(run: LMRun, cfg: dict[str, Any], key: str, json_key: str) -> float | None:
    value = run.override(key)
    return value if value is not None else (cfg.get("optimizer") or {}).get("params", {}).get(json_key)


def launch(run: LMRun, s: LaunchSettings) -> dict[str, Any]:
    """Run ``run`` (or reuse its result, see the resume rule) and return its record: ``run_id``, ``optimizer`` (the
    config name), ``optimizer_label``, ``optimizer_type``, ``batch``, ``world``, ``micro``, ``gas``, ``steps_budget``,
    ``lr`` / ``adam_lr`` / ``warmup`` (the run's peak values), ``point``, ``status`` (``ok``, ``diverged``, ``failed``,
    ``timeout``), ``reused``, ``wall_s`` (the launch, start-up included; 0 when reused), ``log`` and ``result``."""
    run_dir = (s.out / run.run_id).resolve()  # the launcher runs from the repository root
    cfg = run_ds_config(load_ds_config(run.config), run.batch, s.ranks, s.max_micro_batch, s.noise_scale)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "ds_config.json"
    config_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    args, env = train_args(run, s, config_path, run_dir), launch_env(cfg)
    command = command_record(args, s.ranks, cfg, env)
    log_path = run_dir / "launcher.log"
    opt = optimizer_key(cfg)
    lr = _peak(run, cfg, "lr", "muon_lr" if opt == "muon" else "lr")
    record: dict[str, Any] = {
        "run_id": run.run_id, "optimizer": run.config, "optimizer_label": LABELS.get(opt, opt), "optimizer_type": opt,
        "batch": run.batch, "world": s.ranks, "micro": cfg["train_micro_batch_size_per_gpu"],
        "gas": cfg["gradient_accumulation_steps"], "steps_budget": run.steps, "lr": lr,
        "adam_lr": _peak(run, cfg, "adam_lr", "adam_lr") if opt == "muon" else None,
        "warmup": run.override("warmup") or (cfg.get("scheduler") or {}).get("params", {}).get("warmup_num_steps"),
        "point": dict(run.point), "log": str(log_path),
    }  # fmt: skip
    result = reusable_result(run_dir, command)
    if result is not None:
        return {**record, "status": "ok", "reused": True, "wall_s": 0.0, "result": result}
    (run_dir / "result.json").unlink(missing_ok=True)
    (run_dir / "command.json").write_text(json.dumps(command, indent=2) + "\n", encoding="utf-8")
    port = free_port()
    cmd = [*_launcher(), "--num_gpus", str(s.ranks), "--master_port", str(port), *args]
    print("$", " ".join(f"{k}={v}" for k, v in env.items()), " ".join(cmd), file=sys.stderr, flush=True)
    status, _, wall = run_launcher(cmd, {**os.environ, **env}, log_path, port, s.timeout_s, cwd=ROOT)
    if status == "ok" and not (run_dir / "result.json").exists():
        status = "failed"
    if status == "failed" and diverged(log_path):
        status = "diverged"
    result = json.loads((run_dir / "result.json").read_text()) if status == "ok" else None
    return {**record, "status": status, "reused": False, "wall_s": wall, "result": result}


def progress_line(i: int, n: int, r: dict[str, Any]) -> str:
    """The one line printed per finished run."""
    head = f"[{i:>{len(str(n))}}/{n}] {r['run_id']}"
    res = r.get("result")
    if not res:
        return f"{head}: {r['status'].upper()} after {r['wall_s']:.0f} s, log {r['log']}"
    how = "reused" if r.get("reused") else f"{r['wall_s']:.0f} s"
    val = res.get("val_loss")
    val_s = f"{val:.4f}" if isinstance(val, (int, float)) else "non-finite"
    return f"{head}: final val loss {val_s} after {res.get('steps')} steps ({how})"


def run_all(runs: Sequence[LMRun], s: LaunchSettings, records: list[dict[str, Any]] | None = None,
            print_fn: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Launch (or reuse) every run in turn; a failed run is recorded and the rest go on. Appends each record to
    ``records`` (a new list by default) and rewrites ``<out>/results.json`` with all of them after every run."""
    records = [] if records is None else records
    s.out.mkdir(parents=True, exist_ok=True)
    for i, run in enumerate(runs, start=1):
        records.append(launch(run, s))
        tmp = s.out / "results.json.tmp"
        tmp.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, s.out / "results.json")
        print_fn(progress_line(i, len(runs), records[-1]))
    return records
