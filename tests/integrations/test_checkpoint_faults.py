"""SP-NGD checkpoints cannot lose state: a shard set that is incomplete, unreadable, mixed or from another model is
refused with :class:`ds_spngd.checkpoint.SPNGDCheckpointError` naming the tag directory, the shard files and their
ranks — on every rank together, before anything is loaded — and a complete set loads and training continues.

* 1-process unit tests of :func:`ds_spngd.checkpoint.scan_shards` / :func:`read_shards` on shard files written to
  ``tmp_path`` (no DeepSpeed), one per fault kind, plus the atomic :func:`save_shard`;
* real DeepSpeed on 2 gloo CPU ranks (tests/support/checkpoint_fault_worker.py, under a hard timeout: a hang fails
  the test): one job saves, the test damages copies of the checkpoint, one job loads every case in sequence.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ds_spngd import SPNGD
from ds_spngd.checkpoint import (
    SHARD_PATTERN,
    Fault,
    SPNGDCheckpointError,
    SPNGDCheckpointNotFoundError,
    checkpoint_error,
    read_shards,
    remove_stale_shards,
    save_shard,
    scan_shards,
)
from tests.support.harness import TESTS, free_port, rank_env, remove_shm_buffers, run_procs

WORKER = TESTS / "checkpoint_fault_worker.py"
WORLD = 2
S0, S1 = SHARD_PATTERN.format(rank=0), SHARD_PATTERN.format(rank=1)


# ---- one process: the check on shard files ------------------------------------------------------------------------
def _optimizer(layers: int = 2, seed: int = 0, steps: int = 1) -> SPNGD:
    """SP-NGD on an MLP with Fisher blocks "0", "2" (, "4"), after ``steps`` steps."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = [nn.Linear(4, 5)] + [m for _ in range(layers - 2) for m in (nn.ReLU(), nn.Linear(5, 5))]
    model = nn.Sequential(*mods, nn.ReLU(), nn.Linear(5, 3))
    opt = SPNGD(model.parameters(), model=model, config={"lr": 0.1, "damping": 0.1})
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
        opt.step()
    return opt


def _write(tag_dir: Path, opt: SPNGD, world: int = WORLD, ranks: tuple[int, ...] | None = None) -> None:
    """Save ``opt``'s state as the shards ``ranks`` (default all) of a ``world``-rank save."""
    tag_dir.mkdir(parents=True, exist_ok=True)
    for r in range(world) if ranks is None else ranks:
        save_shard({**copy.deepcopy(opt.spngd_state()), "world_size": world, "rank": r}, str(tag_dir), r)


def _refused(tag_dir: Path, *words: str, cls: type[Exception] = SPNGDCheckpointError) -> SPNGDCheckpointError:
    with pytest.raises(cls) as info:
        read_shards(str(tag_dir), ["0", "2"])
    err = info.value
    assert isinstance(err, SPNGDCheckpointError)
    msg = str(err)
    assert str(tag_dir) in msg and err.tag_dir == str(tag_dir), msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return err


def test_a_complete_set_of_another_world_size_loads(tmp_path: Path) -> None:
    opt = _optimizer()
    _write(tmp_path, opt, world=3)
    shards = read_shards(str(tmp_path), {b.name: [f.name for f in b.factors] for b in opt.blocks})
    assert len(shards) == 3
    fresh = _optimizer(seed=1, steps=0)
    fresh.load_sharded_state(shards)
    assert fresh.steps == opt.steps == 1
    for b, b2 in zip(opt.blocks, fresh.blocks, strict=True):
        for f, f2 in zip(b.factors, b2.factors, strict=True):
            assert f.value is not None and f2.value is not None and torch.equal(f.value, f2.value)


def test_a_missing_shard_is_named(tmp_path: Path) -> None:
    _write(tmp_path, _optimizer())
    (tmp_path / S1).unlink()
    err = _refused(tmp_path, f"missing {S1} (rank 1)", "saved by 2 ranks and holds 1 of their 2 shards")
    assert (err.files, err.ranks) == ([S1], [1])
    gap = tmp_path / "gap"  # 3 ranks saved, the middle one is gone
    _write(gap, _optimizer(), world=3, ranks=(0, 2))
    _refused(gap, f"missing {S1} (rank 1)")


def test_a_truncated_shard_is_named(tmp_path: Path) -> None:
    _write(tmp_path, _optimizer())
    path = tmp_path / S0
    os.truncate(path, path.stat().st_size // 2)
    err = _refused(tmp_path, f"{S0} (rank 0) is unreadable (truncated or corrupt)")
    assert (err.files, err.ranks) == ([S0], [0])
    assert "missing" not in str(err)  # an unreadable shard is not also reported missing


def test_shards_of_mixed_saves_are_refused(tmp_path: Path) -> None:
    opt = _optimizer()
    _write(tmp_path / "worlds", opt, ranks=(0,))
    _write(tmp_path / "worlds", opt, world=3, ranks=(1,))
    _refused(tmp_path / "worlds", "different world sizes", f"{S0} (rank 0 of 2)", f"{S1} (rank 1 of 3)")
    _write(tmp_path / "steps", opt, ranks=(0,))
    _write(tmp_path / "steps", _optimizer(steps=2), ranks=(1,))
    _refused(tmp_path / "steps", f"different steps (step 1: {S0} (rank 0); step 2: {S1} (rank 1))")
    _write(tmp_path / "renamed", opt, ranks=(0,))
    shutil.copy(tmp_path / "renamed" / S0, tmp_path / "renamed" / S1)
    _refused(tmp_path / "renamed", f"{S1} records rank 0 of world size 2, as does {S0}", f"missing {S1} (rank 1)")


def test_shards_of_another_model_are_refused(tmp_path: Path) -> None:
    _write(tmp_path, _optimizer(layers=3))
    err = _refused(tmp_path, f"{S0} (rank 0), {S1} (rank 1) do not fit this model", "unexpected: ['4']")
    assert err.ranks == [0, 1]


def test_no_shard_is_not_found(tmp_path: Path) -> None:
    err = _refused(tmp_path, "holds no SP-NGD shard", cls=SPNGDCheckpointNotFoundError)
    assert isinstance(err, FileNotFoundError)
    _refused(tmp_path / "absent", "the tag directory does not exist", cls=FileNotFoundError)
    torch.save({"weights": 1}, tmp_path / S0)
    _refused(tmp_path, f"{S0} (rank 0) is not an SP-NGD shard (has no steps, world_size, rank, blocks)")


def test_faults_of_every_rank_are_reported_together(tmp_path: Path) -> None:
    fault = Fault(f"missing {S1} (rank 1)", [S1], [1])
    same = checkpoint_error("d", [(0, "d", [fault]), (1, "d", [fault])])
    assert f"refused on every rank: ranks 0, 1 found: missing {S1}" in str(same)
    other = checkpoint_error("d", [(1, "e", [fault])])
    assert f"rank 1 found in e: missing {S1}" in str(other) and other.files == [S1]


def test_save_is_atomic_and_removes_stale_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opt = _optimizer()
    _write(tmp_path, opt, world=3)
    before = (tmp_path / S0).read_bytes()

    def crash(obj: Any, f: Any) -> None:
        f.write(b"PK\x03\x04 half a shard")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_shard(opt.spngd_state(), str(tmp_path), 0)
    monkeypatch.undo()
    assert (tmp_path / S0).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [S0, S1, SHARD_PATTERN.format(rank=2)]  # no temporary file left
    _write(tmp_path, opt, world=2)  # the same tag saved again by 2 ranks: rank 2's shard is stale
    assert "different world sizes" in scan_shards(str(tmp_path), ["0", "2"]).faults[0].text
    assert remove_stale_shards(str(tmp_path), 2) == [SHARD_PATTERN.format(rank=2)]
    assert not scan_shards(str(tmp_path), ["0", "2"]).faults


# ---- 2 gloo ranks of real DeepSpeed --------------------------------------------------------------------------------
def _run(out: Path, timeout: float, *args: str) -> list[dict[str, Any]]:
    """Run the worker on 2 gloo ranks (hard timeout); each rank's record."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [sys.executable, str(WORKER), str(out), *args]
    try:
        results = run_procs([cmd] * WORLD, [rank_env(r, WORLD, port) for r in range(WORLD)], timeout, out / "logs")
    finally:
        remove_shm_buffers(port)
    for r, res in enumerate(results):
        assert res.returncode == 0, f"rank {r} {res.status()}:\n{res.tail(4000)}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _cases(saved: Path, base: Path) -> list[dict[str, Any]]:
    """Damaged copies of the ``good`` tag, one directory per case."""

    def copy_of(name: str) -> Path:
        shutil.copytree(saved / "a" / "good", base / name / "good")
        return base / name

    ok, missing, truncated, other, step, none = (copy_of(n) for n in ("ok", "missing", "truncated", "other_model",
                                                                       "step", "no_shard"))
    (ok / "latest").write_text("good")
    (missing / "good" / S1).unlink()
    os.truncate(truncated / "good" / S0, (truncated / "good" / S0).stat().st_size // 2)
    for s in (S0, S1):
        shutil.copy(saved / "b" / "good" / s, other / "good" / s)
        (none / "good" / s).unlink()
    shutil.copy(saved / "a" / "s1" / S1, step / "good" / S1)

    def case(name: str, *dirs: Path, tag: str | None = "good", optim: bool = True) -> dict[str, Any]:
        return {"name": name, "dirs": [str(d) for d in (dirs * WORLD)[:WORLD]], "tag": tag, "optim": optim}

    return [case("missing", missing), case("truncated", truncated), case("other_model", other),
            case("step", step), case("no_shard", none), case("one_rank", ok, missing),
            case("latest_one_rank", ok, missing, tag=None), case("weights_only", missing, optim=False),
            case("resume", ok, tag=None)]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    base = tmp_path_factory.mktemp("checkpoint_faults")
    _run(base / "save", 180, "save")
    cases = _cases(base / "save", base / "faults")
    return {c["name"]: c for c in cases}, _run(base / "load", 180, "load", json.dumps(cases))


FAULTS = {  # case → (error class, words every rank's message holds, the shard file named, its rank)
    "missing": ("SPNGDCheckpointError", f"missing {S1} (rank 1)", S1, 1),
    "truncated": ("SPNGDCheckpointError", f"{S0} (rank 0) is unreadable (truncated or corrupt)", S0, 0),
    "other_model": ("SPNGDCheckpointError", "do not fit this model", S0, 0),
    "step": ("SPNGDCheckpointError", "shards from different steps (step 1:", S1, 1),
    "no_shard": ("SPNGDCheckpointNotFoundError", "holds no SP-NGD shard", "", None),
    "one_rank": ("SPNGDCheckpointError", "rank 1 found", S1, 1),
    "latest_one_rank": ("SPNGDCheckpointError", "the ranks disagree on the tag", "", None),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_every_rank_refuses_a_faulty_checkpoint(loaded: tuple[dict, list[dict]], name: str) -> None:
    cases, records = loaded
    cls, words, shard, shard_rank = FAULTS[name]
    for r, rec in enumerate(records):
        got = rec[name]
        assert got.get("error") == cls, f"rank {r}: {got}"
        assert "SPNGDCheckpointError" in got["classes"] and ("FileNotFoundError" in got["classes"]) == (
            name == "no_shard")
        msg = got["message"]
        print(f"[{name}] rank {r}: {got['error']}: {msg}")
        load_dir = cases[name]["dirs"][r]
        has_tag = cases[name]["tag"] is not None or os.path.exists(os.path.join(load_dir, "latest"))
        tag_dir = os.path.join(load_dir, "good") if has_tag else load_dir
        assert tag_dir in msg and words in msg and shard in msg, msg
        assert shard_rank is None or (f"(rank {shard_rank})" in msg and shard_rank in got["ranks"]), msg
        assert got["seconds"] < 10, f"rank {r} took {got['seconds']:.1f} s to refuse"
        assert got["untouched"], f"rank {r}: the refused load changed the weights or SP-NGD's state"
    if name == "one_rank":  # rank 0's own files were fine: it raises because rank 1 found a fault
        assert records[0][name]["message"].count("found") == 1
    if name == "latest_one_rank":  # rank 0 read `latest`, rank 1 has none: every rank says what it saw
        assert all("this rank found no `latest` file" in rec[name]["message"] for rec in records)


def test_a_complete_checkpoint_loads_and_training_continues(loaded: tuple[dict, list[dict]]) -> None:
    _, records = loaded
    for r, rec in enumerate(records):
        resume, weights = rec["resume"], rec["weights_only"]
        assert "error" not in resume and "error" not in weights, f"rank {r}: {resume} {weights}"
        assert resume["path"] and resume["path"].endswith(os.path.join("ok", "good", "mp_rank_00_model_states.pt"))
        assert (resume["steps_loaded"], resume["steps_after"]) == (2, 3)
        assert torch.isfinite(torch.tensor(resume["loss"]))
        assert weights["path"] and weights["steps_loaded"] == 0  # load_optimizer_states=False: SP-NGD state skipped
