"""Ranks, both sides: the one launcher of the lab, and what every rank does first and last.

Parent side (tests, benchmarks, the sweep):

* :func:`free_port` (a MASTER_PORT) and :func:`rank_env` (the environment of one torch.distributed rank);
* :func:`run_procs`: start processes concurrently, each in its own process group with its output in a file, give
  them a deadline and kill every process group still running when it passes or as soon as one process fails
  (:class:`ProcResult` per process);
* :func:`run_launcher`: one launcher command (``deepspeed ...``) the same way, then the ``/dev/shm`` clean-up of its
  port (the sweep and benchmarks/lm_race.py);
* :func:`launch_ranks` / :func:`worker_or_launch`: a benchmark script re-run as N gloo ranks that write JSON records;
* :func:`shm_buffers` / :func:`remove_shm_buffers`: the shared-memory buffers DeepSpeed's CPU communication op leaves
  behind for a master port.

Rank side (train.py, train_lm.py): :func:`start_ranks`, :func:`finish_ranks`, :func:`peak_rss_mib`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHM_PATTERN = "/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"
POLL_S = 0.2


# ---- parent side: ports, environments, processes ---------------------------------------------------------------
def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(rank: int, world: int, port: int, local_rank: int | None = None, **extra: str) -> dict[str, str]:
    """This process's environment plus that of one torch.distributed rank: env:// rendezvous on 127.0.0.1:``port``,
    one intra-op thread, unbuffered output, then ``extra`` (which overrides any of them).

    ``local_rank`` defaults to ``rank`` (pass 0 to put several ranks on one GPU).
    """
    lr = rank if local_rank is None else local_rank
    return {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(lr),
            "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}  # fmt: skip


@dataclass
class ProcResult:
    """Exit status and combined stdout/stderr of one process.

    ``returncode`` is None when it was killed (deadline passed, or a peer failed first); ``timed_out`` says it was the
    deadline.
    """

    returncode: int | None
    log: str
    timed_out: bool

    def status(self) -> str:
        """"exited N", "timed out" or "killed (a peer failed first)"."""
        if self.returncode is not None:
            return f"exited {self.returncode}"
        return "timed out" if self.timed_out else "killed (a peer failed first)"

    def tail(self, n: int = 6000) -> str:
        """The last ``n`` characters of the log, for error messages."""
        return self.log[-n:]


def _spawn(cmd: Sequence[str], env: dict[str, str], log: Path | None,
           cwd: Path | str | None) -> subprocess.Popen[bytes]:
    """Start ``cmd`` as a session leader (its own process group, pgid == pid), output to ``log`` (None: inherited)."""
    if log is None:
        return subprocess.Popen(list(cmd), env=env, cwd=cwd, start_new_session=True)
    with open(log, "wb") as f:
        return subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process's whole process group (children included) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _wait(procs: list[subprocess.Popen[bytes]], timeout_s: float | None) -> bool:
    """Wait until every process has exited, one has failed, or ``timeout_s`` (None: no limit) has passed; True when
    the deadline passed."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs):
            return False  # one process failed: its peers can only hang now
        if deadline is not None and time.monotonic() > deadline:
            return True
        time.sleep(POLL_S)
    return False


def run_procs(cmds: Sequence[Sequence[str]], envs: Sequence[dict[str, str]], timeout_s: float | None, log_dir: Path,
              cwd: Path | str | None = None) -> list[ProcResult]:
    """Run the commands concurrently (one per rank) and wait at most ``timeout_s`` seconds (None: no limit).

    Each process is started in a new session (its own process group) with its output in ``log_dir/proc<i>.log`` (a
    file, not a pipe, so a chatty rank cannot block on a full pipe while we wait for another). When the deadline
    passes, or as soon as one process exits non-zero, every process still running is killed together with its
    children (``killpg``): a rank whose peer died would otherwise wait in a collective until NCCL/gloo time out. The
    same happens when this process is interrupted.

    Returns:
        One :class:`ProcResult` per command, in order.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    logs = [log_dir / f"proc{i}.log" for i in range(len(cmds))]
    killed: set[int] = set()
    timed_out = False
    try:
        for cmd, env, log in zip(cmds, envs, logs, strict=True):
            procs.append(_spawn(cmd, env, log, cwd))
        timed_out = _wait(procs, timeout_s)
    finally:
        for p in procs:
            if p.poll() is None:
                killed.add(p.pid)
                _kill_group(p)
    results = []
    for p, log in zip(procs, logs, strict=True):
        text = log.read_text(errors="replace") if log.exists() else ""
        mine = p.pid in killed
        results.append(ProcResult(None if mine else p.returncode, text, timed_out and mine))
    return results


def run_launcher(cmd: Sequence[str], env: dict[str, str], log_path: Path, port: int, timeout_s: float,
                 stream: bool = False, cwd: Path | str | None = None) -> tuple[str, int, float]:
    """Run the launcher ``cmd`` (e.g. ``deepspeed --master_port port ...``) in its own process group with a deadline,
    output to ``log_path`` (the terminal with ``stream``), then delete the ``/dev/shm`` buffers of ``port``.

    The launcher's whole process group, ranks included, is killed when the deadline passes or this process is
    interrupted; the buffers are removed however the run ended.

    Returns:
        ``(status, buffers removed, wall seconds)``; status ``ok``, ``failed`` or ``timeout``.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if stream:
        log_path.write_bytes(b"")  # the log exists either way (empty: the output went to the terminal)
    t0 = time.monotonic()
    status, removed = "failed", 0
    try:
        proc = _spawn(cmd, env, None if stream else log_path, cwd)
        try:
            timed_out = _wait([proc], timeout_s)
            status = "timeout" if timed_out else "ok" if proc.returncode == 0 else "failed"
        finally:
            if proc.poll() is None:  # timed out, or this process was interrupted: take the ranks down with it
                _kill_group(proc)
    finally:
        removed = remove_shm_buffers(port)
    return status, removed, time.monotonic() - t0


# ---- parent side: DeepSpeed's /dev/shm buffers ------------------------------------------------------------------
def shm_buffers(port: int) -> list[str]:
    """Paths of the shared-memory buffers DeepSpeed's CPU comm op made for MASTER_PORT ``port``.

    DeepSpeed 0.19.8 builds that op whenever its accelerator is the CPU and never unlinks its files
    (``/dev/shm/deepspeed_allreduce_buffer_<job>_<addr>_<port>_<rank>``, 69 MB per rank, RAM-backed), whether the
    run ended normally or was killed. The port is matched as a whole ``_<port>_`` field, so port 2950 never matches
    29500's buffers.
    """
    return sorted(glob.glob(SHM_PATTERN.format(port=int(port))))


def remove_shm_buffers(port: int) -> int:
    """Delete the :func:`shm_buffers` of MASTER_PORT ``port`` (only that port's); returns how many were removed.

    Call it once the ranks of that port are gone (their launcher exited or was killed): anything that launches ranks
    (tests, benchmarks, the sweep) owns the buffers of its own port and nothing else.
    """
    removed = 0
    for path in shm_buffers(port):
        try:
            os.unlink(path)
            removed += 1
        except OSError:  # already gone (another cleanup, or a rank still exiting)
            pass
    return removed


# ---- parent side: benchmark scripts re-run as ranks ------------------------------------------------------------
def launch_ranks(script: str, ranks: int, out: str, timeout_s: float | None = None) -> list[Any]:
    """Start ``ranks`` copies of ``script`` (``python <script> <this process's args> --worker OUT``, one thread each)
    as one gloo job and return each rank's ``OUT/rank<r>.json`` content; the port's ``/dev/shm`` buffers are removed
    afterwards. Logs are kept in ``OUT/logs``.

    Raises:
        RuntimeError: naming the rank that failed (or was killed), with the tail of its output.
    """
    port = free_port()
    cmd = [sys.executable, script, *sys.argv[1:], "--worker", out]
    try:
        results = run_procs([cmd] * ranks, [rank_env(r, ranks, port) for r in range(ranks)], timeout_s,
                            Path(out, "logs"))  # fmt: skip
    finally:
        remove_shm_buffers(port)  # DeepSpeed's CPU shared-memory all-reduce buffers of this run's port
    for rank, res in enumerate(results):
        if res.returncode != 0:
            raise RuntimeError(f"rank {rank} failed ({res.status()}):\n{res.tail(4000)}")
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(ranks)]


def worker_or_launch(args: argparse.Namespace, script: str, worker: Callable[[argparse.Namespace], None],
                     report: Callable[[argparse.Namespace, list[Any]], None]) -> None:
    """In a rank (``--worker OUT`` given): run ``worker``. Else launch ``args.ranks`` ranks of ``script`` and hand
    their records to ``report``."""
    if args.worker is not None:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix=Path(script).stem + "_") as out:
        report(args, launch_ranks(script, args.ranks, out))


# ---- rank side ---------------------------------------------------------------------------------------------------
def start_ranks() -> tuple[int, int]:
    """Join DeepSpeed's process group and return (rank, world size). On CPU every rank gets its share of the cores
    (DeepSpeed's launcher gives each CPU rank all of them, which oversubscribes the machine)."""
    import deepspeed
    import torch
    import torch.distributed as dist

    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world)))
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    return rank, world


def finish_ranks() -> None:
    """Tear the process group down explicitly: left to interpreter exit, gloo ranks sometimes abort ("terminate
    called without an active exception") after all work is done, failing the launcher."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def peak_rss_mib(world: int) -> list[float]:
    """Peak resident memory (``ru_maxrss``, MiB) of every rank's process, gathered onto all ranks."""
    import torch
    import torch.distributed as dist

    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    if world == 1:
        return [mine]
    vec = torch.zeros(world, dtype=torch.float64)
    vec[dist.get_rank()] = mine
    dist.all_reduce(vec, op=dist.ReduceOp.SUM)
    return [float(v) for v in vec]
