"""Run a scaling sweep through the DeepSpeed launcher, one run at a time.

Each run of the grid (:mod:`ds_spngd_lab.sweep.grid`) becomes::

    deepspeed --num_gpus W --master_port P train.py --dataset fashion-mnist --model M
        --deepspeed_config <out>/configs/<run>.json --global-batch B --epochs E --eval-interval K
        --target-acc T --seed S --out-dir <out>/runs/<run>

on a port free at launch time, with the launcher's whole process group killed when the run exceeds its time limit.
After every run, ended normally, failed or killed, the ``/dev/shm`` buffers of *its own port* are deleted
(:func:`ds_spngd_lab.ranks.run_launcher`; DeepSpeed 0.19.8's CPU all-reduce leaves 69 MB per rank there), so a sweep
of hundreds of CPU runs does not fill the machine's memory.

Weights & Biases: every run logs through DeepSpeed's ``wandb`` monitor (project, group = sweep name) to
``WANDB_DIR = <out>``, named by its run id (``WANDB_NAME``) and tagged with its optimizer, batch and LR multiplier.
The mode is ``offline`` unless the user is logged in (``WANDB_API_KEY`` set, or a netrc entry for the W&B host) or
``WANDB_MODE`` / ``--wandb-mode`` says otherwise; offline runs land in ``<out>/wandb/offline-run-*`` for
``wandb sync``. ``train.py`` writes the run's config and summary and finishes the W&B run itself.

Progress: one line per finished run (the run's own tqdm bar goes to its log, ``<out>/logs/<run>.log``, or to the
terminal with ``stream=True``). Each launch is appended to ``<out>/runs.jsonl`` as it ends, and ``<out>/results.json``
(what :mod:`ds_spngd_lab.sweep.report` reads) is rewritten after every run; with ``resume`` a run whose ``result.json``
already exists is not launched again.
"""

from __future__ import annotations

import json
import netrc
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ds_spngd_lab.ranks import free_port, run_launcher
from ds_spngd_lab.sweep.grid import RunSpec, base_config, build_grid, peak_lr, run_config

__all__ = ["RunOutcome", "SweepSettings", "diverged", "launch_run", "run_sweep", "train_size", "wandb_mode",
           "write_results"]

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SIZES = {"mnist": 50_000, "fashion-mnist": 50_000}  # train splits (ds_spngd_lab.data): the rest is validation
WANDB_MODES = ("auto", "offline", "online", "disabled")


@dataclass
class SweepSettings:
    """Everything a sweep needs; the CLI (``launch/sweep.py``) fills it from argparse.

    ``worlds`` are data-parallel world sizes; ``max_steps`` (None: the whole ``epochs`` budget) caps every run;
    ``timeout_s`` kills a run that takes longer; ``wandb_mode`` is one of ``auto`` (offline unless logged in),
    ``offline``, ``online``, ``disabled`` (no wandb section at all).
    """

    name: str
    out_dir: Path
    optimizers: Sequence[str] = ("sgd", "lars", "lamb", "spngd")
    batches: Sequence[int] = (256, 1024, 4096, 16384)
    lr_mults: Sequence[float] = (0.5, 1.0, 2.0)
    worlds: Sequence[int] = (2,)
    epochs: float = 10.0
    model: str = "mlp"
    dataset: str = "fashion-mnist"
    target_acc: float = 0.88
    seed: int = 0
    max_steps: int | None = None
    max_micro_batch: int = 2048
    evals_per_epoch: int = 4
    timeout_s: float = 1800.0
    project: str = "ds_spngd-scaling"
    wandb_mode: str = "auto"
    resume: bool = False
    stream: bool = False
    extra_args: Sequence[str] = field(default_factory=tuple)

    def grid(self) -> list[RunSpec]:
        """The runs of this sweep (:func:`ds_spngd_lab.sweep.grid.build_grid`)."""
        return build_grid(self.optimizers, self.batches, self.lr_mults, self.worlds, self.epochs,
                          self.max_micro_batch, train_size(self.dataset), self.evals_per_epoch)  # fmt: skip


@dataclass
class RunOutcome:
    """How one run ended: ``status`` is ``ok``, ``diverged`` (train.py stopped on a non-finite loss), ``failed``
    (another non-zero exit, or no result.json) or ``timeout``.

    ``result`` is the run's ``result.json`` (None unless ok); ``lr`` the peak LR the run used; ``wall_s`` the whole
    launch (start-up and evaluation included); ``shm_removed`` how many ``/dev/shm`` buffers of its port were deleted.
    """

    run: RunSpec
    status: str
    lr: float
    wall_s: float
    port: int
    log: str
    shm_removed: int = 0
    result: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        """One JSON line of ``runs.jsonl``: the grid point, the outcome and the result."""
        return {"run_id": self.run.run_id, "optimizer_label": self.run.label, **asdict(self.run), "lr": self.lr,
                "status": self.status, "wall_s": self.wall_s, "port": self.port, "log": self.log,
                "shm_removed": self.shm_removed, "result": self.result}  # fmt: skip


def train_size(dataset: str) -> int:
    """Training-split size of a built-in data set (for steps per epoch and evaluation intervals)."""
    if dataset not in TRAIN_SIZES:
        raise ValueError(f"unknown data set {dataset!r}; choose from {sorted(TRAIN_SIZES)}")
    return TRAIN_SIZES[dataset]


def wandb_mode(requested: str = "auto", env: dict[str, str] | None = None, netrc_path: str | None = None) -> str:
    """The W&B mode for the runs: ``requested`` unless it is ``auto``; then ``WANDB_MODE`` if set, ``online`` when the
    user is logged in (``WANDB_API_KEY``, or a netrc entry for ``WANDB_BASE_URL``'s host, by default
    api.wandb.ai, as ``wandb login`` writes), else ``offline``."""
    if requested not in WANDB_MODES:
        raise ValueError(f"wandb mode must be one of {WANDB_MODES}, got {requested!r}")
    if requested != "auto":
        return requested
    env = dict(os.environ) if env is None else env
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    if env.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        if netrc.netrc(netrc_path).authenticators(host):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


def _launcher() -> list[str]:
    exe = Path(sys.executable).with_name("deepspeed")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]


def train_command(run: RunSpec, s: SweepSettings, config: Path, out: Path, port: int) -> list[str]:
    """The deepspeed launcher command line of ``run``."""
    cmd = [*_launcher(), "--num_gpus", str(run.world), "--master_port", str(port), "train.py",
           "--dataset", s.dataset, "--model", s.model, "--deepspeed_config", str(config),
           "--global-batch", str(run.batch), "--epochs", f"{run.epochs:g}", "--eval-interval", str(run.eval_interval),
           "--target-acc", f"{s.target_acc:g}", "--seed", str(s.seed), "--out-dir", str(out)]  # fmt: skip
    if s.max_steps is not None:
        cmd += ["--max-steps", str(s.max_steps)]
    return [*cmd, *s.extra_args]


def run_env(run: RunSpec, s: SweepSettings, mode: str) -> dict[str, str]:
    """Environment of one launch: W&B mode, folder, run name and tags (inherited by the ranks)."""
    env = dict(os.environ)
    env.update(WANDB_MODE=mode, WANDB_DIR=str(s.out_dir.resolve()), WANDB_NAME=f"{s.name}-{run.run_id}",
               WANDB_TAGS=f"{run.label},b{run.batch},lr{run.lr_mult:g},w{run.world}", WANDB_SILENT="true",
               WANDB_CONSOLE="off", PYTHONUNBUFFERED="1")  # fmt: skip
    return env


def launch_run(cmd: list[str], env: dict[str, str], log_path: Path, port: int, timeout_s: float,
               stream: bool = False, cwd: Path = ROOT) -> tuple[str, int, float]:
    """Run the launcher ``cmd`` from the repository root (:func:`ds_spngd_lab.ranks.run_launcher`: its own process
    group, a deadline, then the ``/dev/shm`` buffers of ``port`` deleted). Returns ``(status, buffers removed, wall
    seconds)``: status ``ok``, ``failed`` or ``timeout``."""
    return run_launcher(cmd, env, log_path, port, timeout_s, stream=stream, cwd=cwd)


def diverged(log_path: Path) -> bool:
    """True when the run stopped on a non-finite loss (train.py's FloatingPointError), i.e. the LR diverged."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 200_000))
            return b"FloatingPointError" in f.read()
    except OSError:
        return False


def progress_line(i: int, n: int, o: RunOutcome) -> str:
    """The one line printed per finished run."""
    head = f"[{i:>{len(str(n))}}/{n}] {o.run.label:<9} B={o.run.batch:<5} lr={o.lr:<8.4g} (x{o.run.lr_mult:g})"
    if o.result is None:
        return f"{head} {o.status.upper()} after {o.wall_s:.0f} s, log {o.log}"
    r = o.result
    steps = r.get("steps_to_target")
    reach = f"target at step {steps} ({r['time_to_target_s']:.1f} s)" if steps is not None else "target not reached"
    noise = r.get("noise_scale_B_simple_at_target")  # the final one is late-training noise (ds_spngd_lab.sweep.report)
    noise_s = f", B_simple at target {noise:.0f}" if isinstance(noise, (int, float)) else ""
    return f"{head} top-1 {100 * r['test_top1']:.2f}%, {reach}{noise_s}, {o.wall_s:.0f} s"


def run_sweep(s: SweepSettings, print_fn: Callable[[str], None] = print) -> list[RunOutcome]:
    """Run every grid point in turn and return the outcomes (each launch is also appended to ``<out>/runs.jsonl``).

    A failed, diverged or timed-out run is recorded and the sweep goes on. The ``wandb`` section is left out with
    mode ``disabled``. With ``resume``, a run already recorded in ``<out>/results.json`` as ``ok`` or ``diverged``
    (or whose ``result.json`` exists) is not launched again, and the records of earlier invocations that are not in
    this grid are kept: a sweep can be extended by another batch, optimizer or LR multiplier.
    """
    mode = wandb_mode(s.wandb_mode)
    runs = s.grid()
    s.out_dir.mkdir(parents=True, exist_ok=True)
    previous = _previous_records(s.out_dir) if s.resume else {}
    records: dict[str, dict[str, Any]] = dict(previous)
    run_ids = list(dict.fromkeys([*previous, *(r.run_id for r in runs)]))
    (s.out_dir / "sweep.json").write_text(json.dumps({**asdict(s), "out_dir": str(s.out_dir), "wandb_mode": mode,
                                                       "runs": run_ids}, indent=2) + "\n")  # fmt: skip
    print_fn(f"sweep {s.name}: {len(runs)} runs, W&B {mode} (project {s.project}, group {s.name}), out {s.out_dir}")
    outcomes = []
    with open(s.out_dir / "runs.jsonl", "a", encoding="utf-8") as jsonl:
        for i, run in enumerate(runs, start=1):
            cfg = run_config(run, base_config(run.optimizer), s.project, s.name, wandb=mode != "disabled")
            config_path = s.out_dir / "configs" / f"{run.run_id}.json"
            config_path.parent.mkdir(parents=True, exist_ok=True)
            config_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
            out = s.out_dir / "runs" / run.run_id
            log_path = s.out_dir / "logs" / f"{run.run_id}.log"
            result_path = out / "result.json"
            old = previous.get(run.run_id)
            if old is not None and old["status"] in ("ok", "diverged"):
                outcome = RunOutcome(run, old["status"], old["lr"], old["wall_s"], old["port"], old["log"],
                                     old["shm_removed"], old["result"])  # fmt: skip
            elif s.resume and result_path.exists():
                outcome = RunOutcome(run, "ok", peak_lr(cfg, run.batch), 0.0, 0, str(log_path),
                                     result=json.loads(result_path.read_text()))  # fmt: skip
            else:
                result_path.unlink(missing_ok=True)
                port = free_port()
                cmd = train_command(run, s, config_path.resolve(), out.resolve(), port)
                status, removed, wall = launch_run(cmd, run_env(run, s, mode), log_path, port, s.timeout_s, s.stream)
                if status == "ok" and not result_path.exists():
                    status = "failed"
                if status == "failed" and diverged(log_path):
                    status = "diverged"
                result = json.loads(result_path.read_text()) if status == "ok" else None
                outcome = RunOutcome(run, status, peak_lr(cfg, run.batch), wall, port, str(log_path), removed, result)
                jsonl.write(json.dumps(outcome.record()) + "\n")
                jsonl.flush()
            outcomes.append(outcome)
            records[run.run_id] = outcome.record()
            write_results(s.out_dir, [records[k] for k in run_ids if k in records])
            print_fn(progress_line(i, len(runs), outcome))
    return outcomes


def _previous_records(out_dir: Path) -> dict[str, dict[str, Any]]:
    path = out_dir / "results.json"
    if not path.exists():
        return {}
    return {r["run_id"]: r for r in json.loads(path.read_text(encoding="utf-8"))}


def write_results(out_dir: Path, records: Sequence[dict[str, Any]]) -> Path:
    """Write ``<out>/results.json``: the runs' :meth:`RunOutcome.record` dicts, in grid order (atomic replace)."""
    path = out_dir / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(list(records), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
