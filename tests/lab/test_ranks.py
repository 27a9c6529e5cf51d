"""Tests for ds_spngd_lab.ranks, the one launcher of tests, benchmarks and the sweep: deadlines and first failures
kill every process group, logs land in files, benchmark ranks return their records or name the rank that failed."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from ds_spngd_lab import ranks


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_free_port_and_rank_env() -> None:
    port = ranks.free_port()
    assert 0 < port < 65536
    env = ranks.rank_env(1, 2, port, OMP_NUM_THREADS="2")
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_PORT"]) == ("1", "2", "1", str(port))
    assert env["OMP_NUM_THREADS"] == "2" and env["PATH"] == os.environ["PATH"]
    assert ranks.rank_env(1, 2, port, local_rank=0)["LOCAL_RANK"] == "0"


def test_run_procs_kills_peers_when_one_fails(tmp_path: Path) -> None:
    t0 = time.monotonic()
    child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    results = ranks.run_procs([_py("print('bye'); raise SystemExit(3)"), _py(child + "time.sleep(60)")],
                              [dict(os.environ)] * 2, 60.0, tmp_path / "logs")  # fmt: skip
    assert time.monotonic() - t0 < 30
    assert results[0].returncode == 3 and "bye" in results[0].log and results[0].status() == "exited 3"
    assert results[1].returncode is None and not results[1].timed_out
    assert results[1].status() == "killed (a peer failed first)"
    assert (tmp_path / "logs" / "proc0.log").exists()


def test_run_procs_deadline(tmp_path: Path) -> None:
    (res,) = ranks.run_procs([_py("import time; print('up', flush=True); time.sleep(60)")], [dict(os.environ)], 2.0,
                             tmp_path)  # fmt: skip
    assert res.timed_out and res.returncode is None and res.status() == "timed out" and "up" in res.tail()


def test_run_launcher_stream_keeps_an_empty_log(tmp_path: Path) -> None:
    status, removed, wall = ranks.run_launcher(_py("pass"), dict(os.environ), tmp_path / "l" / "run.log",
                                               ranks.free_port(), 30.0, stream=True)  # fmt: skip
    assert status == "ok" and removed == 0 and wall < 30 and (tmp_path / "l" / "run.log").read_text() == ""


def test_launch_ranks_collects_records_and_names_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "bench.py"
    script.write_text("import json, os, sys\n"
                      "out = sys.argv[sys.argv.index('--worker') + 1]\n"
                      "r = int(os.environ['RANK'])\n"
                      "if '--fail' in sys.argv and r == 0:\n    raise SystemExit('rank zero broke')\n"
                      "with open(os.path.join(out, f'rank{r}.json'), 'w') as f:\n"
                      "    json.dump({'rank': r, 'args': sys.argv}, f)\n")
    monkeypatch.setattr(sys, "argv", ["bench.py", "--x", "1"])
    records = ranks.launch_ranks(str(script), 2, str(tmp_path / "ok"), timeout_s=60.0)
    assert [r["rank"] for r in records] == [0, 1] and records[0]["args"][1:3] == ["--x", "1"]
    monkeypatch.setattr(sys, "argv", ["bench.py", "--fail"])
    with pytest.raises(RuntimeError, match=r"rank 0 failed \(exited 1\):\n.*rank zero broke"):
        ranks.launch_ranks(str(script), 2, str(tmp_path / "bad"), timeout_s=60.0)
