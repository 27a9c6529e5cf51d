"""Data-parallel equivalence through the real DeepSpeed engine (gloo, CPU): the SP-NGD update depends on the global
batch only, not on how it is split over ranks and micro-batches (factors are per-example averages, Issue contract).

Each configuration runs the same fixed global batches; parameters after every step are compared with world size 1,
gradient_accumulation_steps 1. fp32 tolerance: 1e-5 relative (summation order); bf16 runs use a 5e-2 tolerance
relative to the parameter scale, since bf16 activations round differently when batches are split.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("dist_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(world: int, cases: list[dict], out: Path) -> list[torch.Tensor]:
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), json.dumps(cases)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        stdout, _ = p.communicate(timeout=600)
        logs.append(stdout)
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, f"rank failed:\n{log[-4000:]}"
    return [torch.load(out / f"{i}.pt") for i in range(len(cases))]


CASES = [
    {"gas": 1, "bf16": False, "inverse_method": "inverse", "steps": 5},
    {"gas": 2, "bf16": False, "inverse_method": "inverse", "steps": 5},
    {"gas": 1, "bf16": False, "inverse_method": "eigen", "steps": 5},
    {"gas": 1, "bf16": True, "inverse_method": "inverse", "steps": 5, "damping": 0.3},
    {"gas": 2, "bf16": True, "inverse_method": "inverse", "steps": 5, "damping": 0.3},
    {"gas": 1, "bf16": False, "inverse_method": "inverse", "steps": 5, "damping": 0.3},
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[torch.Tensor]]:
    base = tmp_path_factory.mktemp("dist")
    runs = {world: launch(world, CASES, base / f"w{world}") for world in (1, 2)}
    runs[3] = launch(3, CASES[:3], base / "w3")  # odd world: inversion owners split 2/1/1 ways
    return runs


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    scale = float(a.abs().max())
    torch.testing.assert_close(a, b, rtol=0.0, atol=rtol * scale)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", [0, 1, 2])
def test_ranks_equal_one_rank_fp32(runs: dict, case: int, world: int) -> None:
    """w ranks × 1/w of the batch (and × gas) == 1 rank × whole batch, every step; inversions spread over ranks."""
    ref = runs[1][0] if CASES[case]["inverse_method"] == "inverse" else runs[1][case]
    # eigen: fp32 eigh of factors summed in another order is ~1e-5 off after 5 momentum steps
    _close(ref, runs[world][case], 1e-5 if CASES[case]["inverse_method"] == "inverse" else 5e-5)


def test_accumulation_equals_big_micro_batch_fp32(runs: dict) -> None:
    _close(runs[1][0], runs[1][1], 1e-5)


def test_updates_actually_move_and_differ_from_sgd_direction(runs: dict) -> None:
    """Guards against a vacuous equivalence: parameters change every step, and eigen ≠ inverse damping."""
    hist = runs[1][0]
    assert all(float((hist[i + 1] - hist[i]).abs().max()) > 1e-4 for i in range(len(hist) - 1))
    assert float((runs[1][0] - runs[1][2]).abs().max()) > 1e-5


@pytest.mark.parametrize("case", [3, 4])
def test_bf16_world_and_accumulation(runs: dict, case: int) -> None:
    """bf16 (fp32 master weights, bf16 activations/gradients): 2 ranks and gas=2 follow 1 rank; bf16 follows fp32.

    Measured on this toy (random labels, lr warming up to 0.2): bf16 1-vs-2 ranks differ by ~1.4e-3 after 5 steps;
    bf16 vs fp32 by ~1.2e-2 after 3 steps. Plain momentum SGD through the same bf16 path drifts as much (3e-2 after
    5 steps between 1 and 2 ranks), so these are bf16 rounding, not SP-NGD, and the tolerances are set above them.
    """
    _close(runs[1][3], runs[2][case], 1e-2)
    _close(runs[1][5][:3], runs[2][case][:3], 2e-2)
