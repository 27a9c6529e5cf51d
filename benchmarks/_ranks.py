"""Shared by the multi-rank benchmarks: re-run the calling script as ``ranks`` gloo ranks (one thread each).

Each rank is ``python <script> <same args> --worker OUT`` and must write ``OUT/rank<r>.json``; the parent collects them
and removes the /dev/shm buffers DeepSpeed's CPU all-reduce leaves for the run's port.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ds_spngd_lab.run_log import remove_shm_buffers


def launch_ranks(script: str, ranks: int, out: str) -> list[Any]:
    """Start ``ranks`` copies of ``script`` as one gloo job and return each rank's ``rank<r>.json`` content.

    Raises:
        RuntimeError: naming the rank that failed, with the tail of its output.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(ranks):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, script, *sys.argv[1:], "--worker", out], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate()[0] for p in procs]
    finally:
        remove_shm_buffers(port)  # DeepSpeed's CPU shared-memory all-reduce buffers of this run's port
    for rank, (p, log) in enumerate(zip(procs, logs, strict=True)):
        if p.returncode != 0:
            raise RuntimeError(f"rank {rank} failed (exit {p.returncode}):\n{log[-4000:]}")
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
