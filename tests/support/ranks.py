"""Shared by the multi-rank CPU tests: run the rank worker (the tests/support/worker package) on gloo ranks with a
hard timeout (tests/support/harness.py: every rank in its own process group, logs in files, all ranks killed when the
deadline passes or one rank fails — a hang fails the test, not the test run) and collect each rank's record.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tests.support.harness import free_port, rank_env, remove_shm_buffers, run_procs

WORKER = Path(__file__).with_name("worker")  # a package run by its path: python WORKER OUT CASES_JSON (its __main__)


class RanksHung(AssertionError):
    """The ranks did not all finish within the timeout (a hang); carries every rank's output."""


def run_ranks(world: int, cases: list[dict], out: Path, timeout: float = 600.0) -> None:
    """Run ``cases`` (JSON objects, see :class:`tests.support.worker.case.Case`) on ``world`` gloo ranks of the worker.

    Raises:
        RanksHung: not every rank finished within ``timeout`` seconds (all were killed).
        AssertionError: a rank exited non-zero (its output tail in the message).
    """
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [sys.executable, str(WORKER), str(out), json.dumps(cases)]
    try:
        results = run_procs([cmd] * world, [rank_env(r, world, port) for r in range(world)], timeout, out / "logs")
    finally:
        remove_shm_buffers(port)
    if any(res.timed_out for res in results):
        raise RanksHung(f"{world} ranks did not finish within {timeout:.0f} s (a hang):\n"
                        + "\n---\n".join(res.tail(3000) for res in results))
    for r, res in enumerate(results):
        assert res.returncode == 0, f"rank {r} {res.status()}:\n{res.tail(4000)}"


def launch(world: int, cases: list[dict], out: Path, timeout: float = 600.0) -> list[dict]:
    """Run the cases; per case {"params", "loss" (rank 0's, when a step completed), "stats" (per rank, per step),
    "ranks" (each rank's full record, :class:`tests.support.worker.recording.RankRecord`)}."""
    run_ranks(world, cases, out, timeout)
    results = []
    for i in range(len(cases)):
        ranks = [torch.load(out / f"{i}.r{k}.pt", weights_only=False) for k in range(world)]
        r = torch.load(out / f"{i}.pt") if (out / f"{i}.pt").exists() else {}
        r["stats"] = [rk["stats"] for rk in ranks]
        r["ranks"] = ranks
        results.append(r)
    return results


def launch_worlds(worlds: tuple[int, ...], cases: dict[str, dict], base: Path,
                  timeout: float = 300.0) -> dict[int, dict[str, dict]]:
    """:func:`launch` the named ``cases`` once per world size; {world: {case name: result}}."""
    names = list(cases)
    return {w: dict(zip(names, launch(w, [cases[n] for n in names], base / f"w{w}", timeout), strict=True))
            for w in worlds}


def assert_identical_replicas(ranks: list[dict], steps: int | None = None, failed: bool = False) -> None:
    """Every rank finished without an error (after ``steps`` steps when given; ``failed``: the ranks stopped on an
    error, the test checks it) and its parameters are finite and bitwise equal to rank 0's after every step."""
    for r, rec in enumerate(ranks):
        assert failed or rec["error"] is None, f"rank {r}: {rec['error']}"
        assert steps is None or len(rec["params"]) == steps, f"rank {r} ran {len(rec['params'])} steps"
    for step, ref in enumerate(ranks[0]["params"]):
        assert torch.isfinite(ref).all(), f"step {step}: non-finite parameters"
        for r, rec in enumerate(ranks[1:], start=1):
            diff = float((rec["params"][step] - ref).abs().max())
            assert torch.equal(rec["params"][step], ref), f"step {step}: rank {r} differs by {diff:.3g}"
