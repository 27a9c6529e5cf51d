"""A fault on one rank ends the step the same way on every rank — an error naming the layer, or a skipped step —
never a hang (the ranks run under a hard timeout, tests/support/ranks.py).

Faults are injected on ONE rank of 2 or 3 (tests/support/worker/, "inject"):

* factor statistics: that rank's micro-batch × 1e19 — its A factors overflow to Inf while the gradients stay finite
  (LayerNorm follows fc1; asserted at stage 0, else the test would exercise the gradient path). The Inf reaches the
  factor's owner through the reduction; before, the owner raised alone and the others hung in the next broadcast;
* gradient: one parameter's gradient × Inf on that rank before DeepSpeed's reduction (stage 0: every rank then holds
  it; ZeRO 2: DeepSpeed's own overflow check skips the step, which SP-NGD treats like its own finding);
* inversion: the drafts of the blocks that rank owns raise a LinAlgError, or come out NaN;
* contributions after a bucket left (a layer called twice on that rank, one bucket per factor);
* a layer whose hooks fire on that rank only (legitimate: its factors are the mean over the ranks where it fired).

With ``nonfinite: "raise"`` every rank raises at the same step, with the same type and the same message, within
seconds of each other, and no parameter moved; with ``"skip"`` every rank skips the same step, DeepSpeed counts it and
holds the LR scheduler, and the run afterwards equals, bit for bit, a run in which the bad batch never happened
(so factors, preconditioners, momentum and counters were untouched); more than ``max_consecutive_skips`` skips in a
row raise. Parameters stay finite and identical on every rank throughout.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.ranks import assert_identical_replicas, launch_worlds

F = {"gas": 1, "bf16": False, "inverse_method": "inverse", "steps": 6, "kl_clip": 0.05, "weight_rescale": True}
AT = 4  # an inversion step (inv_update_steps = 2), with momentum and preconditioners in place


def _inj(kind: str, step: int = AT, steps: int = 1) -> dict:
    return {"inject": {"kind": kind, "rank": 1, "step": step, "steps": steps}}


RAISE = {
    "factor_comm": {**F, **_inj("factor")},
    "factor_mem": {**F, **_inj("factor"), "mode": "mem_opt"},
    "factor_z2": {**F, **_inj("factor"), "zero": 2},
    "factor_z2_mem": {**F, **_inj("factor"), "zero": 2, "mode": "mem_opt"},
    "grad_comm": {**F, **_inj("grad")},
    "grad_mem": {**F, **_inj("grad"), "mode": "mem_opt"},
    "grad_z2": {**F, **_inj("grad"), "zero": 2},
    "inversion_comm": {**F, **_inj("inversion")},
    "inversion_mem": {**F, **_inj("inversion"), "mode": "mem_opt"},
    "inversion_nan_z2": {**F, **_inj("inversion_nan"), "zero": 2},
    "factor_z3": {**F, **_inj("factor"), "zero": 3},
    "grad_z3_mem": {**F, **_inj("grad"), "zero": 3, "mode": "mem_opt"},
    "inversion_nan_z3": {**F, **_inj("inversion_nan"), "zero": 3},
    "late": {**F, **_inj("late"), "extra": "twice", "bucket_cap_mb": 1e-6},
    "consecutive": {**F, "steps": 8, **_inj("factor", AT, 3), "nonfinite": "skip", "max_consecutive_skips": 2},
}
# async_inverse: the inversion launched at step AT fails on rank 1's worker; every rank learns it at the install step
ASYNC_INV = {"inversion_async": {**F, "steps": 8, **_inj("inversion", AT, 3), "async_inverse": True}}
EXPECTED = {  # (exception type, words of the message, the step it is raised at)
    "factor": ("FloatingPointError", "NaN/Inf in the reduced factor statistics", AT),
    "grad": ("FloatingPointError", "NaN/Inf", AT),
    "inversion": ("FloatingPointError", "inverting on rank 1 failed", AT),
    "late": ("RuntimeError", "arrived after its bucket was sent", AT),
    "consecutive": ("FloatingPointError", "after 2 consecutive steps (max_consecutive_skips=2) were skipped", AT + 2),
}
SKIP_AT = 2  # during the LR warmup, so a held scheduler shows
SKIP = {
    "skip_factor": {**F, **_inj("factor", SKIP_AT), "nonfinite": "skip"},
    "skip_factor_z2_mem": {**F, **_inj("factor", SKIP_AT), "nonfinite": "skip", "zero": 2, "mode": "mem_opt"},
    "skip_grad_mem": {**F, **_inj("grad", SKIP_AT), "nonfinite": "skip", "mode": "mem_opt"},
    "skip_grad_z2": {**F, **_inj("grad", SKIP_AT), "nonfinite": "skip", "zero": 2},
    "skip_factor_z3": {**F, **_inj("factor", SKIP_AT), "nonfinite": "skip", "zero": 3},
    "skip_grad_z3_mem": {**F, **_inj("grad", SKIP_AT), "nonfinite": "skip", "zero": 3, "mode": "mem_opt"},
    "skip_inversion": {**F, **_inj("inversion", SKIP_AT), "nonfinite": "skip"},
    "skip_inversion_nan_mem": {**F, **_inj("inversion_nan", SKIP_AT), "nonfinite": "skip", "mode": "mem_opt"},
}
REFERENCE = {  # the same runs without the bad batch
    f"omit_{k}": {**{a: b for a, b in v.items() if a not in ("inject", "nonfinite")}, "omit": [SKIP_AT]}
    for k, v in SKIP.items()}
OTHER = {"rank0_only": {**F, "extra": "rank0"}, "rank0_only_mem_z1": {**F, "extra": "rank0", "mode": "mem_opt",
                                                                      "zero": 1}}
CASES = {**RAISE, **SKIP, **REFERENCE, **OTHER, **ASYNC_INV}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, dict]]:
    return launch_worlds((2, 3), CASES, tmp_path_factory.mktemp("faults"))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(RAISE))
def test_every_rank_raises_the_same_error_at_the_same_step(runs: dict, world: int, name: str) -> None:
    ranks = runs[world][name]["ranks"]
    kind = "consecutive" if name == "consecutive" else name.split("_")[0]
    etype, words, at = EXPECTED[kind]
    errors = [rec["error"] for rec in ranks]
    assert all(e is not None for e in errors), f"a rank finished without an error: {errors}"
    for r, e in enumerate(errors):
        assert (e["step"], e["type"]) == (at, etype), f"rank {r}: {e['type']} at step {e['step']}: {e['trace']}"
        assert words in e["message"], e["message"]
        assert e["message"] == errors[0]["message"], "ranks disagree on the message"
    assert max(e["time"] for e in errors) - min(e["time"] for e in errors) < 10.0
    if kind == "factor":
        assert ".A" in errors[0]["message"] or ".F" in errors[0]["message"]
        if CASES[name].get("zero", 0) == 0:  # the injection left the gradients finite: the factor path raised
            assert all(rec["grads_finite"][at] for rec in ranks)
    if kind == "late":
        assert "extra." in errors[0]["message"]
    for r, rec in enumerate(ranks):  # nothing moved in the failed step (nor in skipped ones before it)
        assert torch.equal(rec["error"]["params"], rec["params"][AT - 1]), f"rank {r}: parameters changed"
    assert_identical_replicas(ranks, failed=True)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(SKIP))
def test_every_rank_skips_the_same_step_and_nothing_of_it_remains(runs: dict, world: int, name: str) -> None:
    ranks, ref = runs[world][name]["ranks"], runs[world][f"omit_{name}"]["ranks"]
    for r, rec in enumerate(ranks):
        assert rec["error"] is None, f"rank {r}: {rec['error']}"
        assert rec["skipped"] == [0] * SKIP_AT + [1] * (F["steps"] - SKIP_AT), rec["skipped"]
        assert rec["ds_skipped"][SKIP_AT] == rec["ds_skipped"][SKIP_AT - 1] + 1  # DeepSpeed counted it...
        assert rec["lr"][SKIP_AT] == rec["lr"][SKIP_AT - 1] != rec["lr"][SKIP_AT - 2]  # ...and held the scheduler
        assert torch.equal(rec["params"][SKIP_AT], rec["params"][SKIP_AT - 1])
        for step, (a, b) in enumerate(zip(rec["params"], ref[r]["params"], strict=True)):
            assert torch.equal(a, b), f"rank {r} step {step}: differs from the run that never saw the bad batch"
    assert float((ranks[0]["params"][-1] - ranks[0]["params"][SKIP_AT]).abs().max()) > 0  # training went on
    assert_identical_replicas(ranks, F["steps"])


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(OTHER))
def test_hooks_that_fire_on_one_rank_only_are_agreed_on(runs: dict, world: int, name: str) -> None:
    """The extra layer's factors are the mean over the ranks where it ran; every rank agrees, nothing hangs."""
    assert_identical_replicas(runs[world][name]["ranks"], F["steps"])


@pytest.mark.parametrize("world", [2, 3])
def test_async_inversion_failure_is_agreed_at_its_install_step(runs: dict, world: int) -> None:
    """``async_inverse``: the drafts of rank 1's blocks fail on its worker thread at launch step AT; the failure codes
    are agreed at the install step AT + inv_update_steps, where every rank raises the same error, having changed
    nothing in that step (the steps in between trained with the previous preconditioners)."""
    ranks = runs[world]["inversion_async"]["ranks"]
    at = AT + int(F.get("inv_update_steps", 2))
    errors = [rec["error"] for rec in ranks]
    assert all(e is not None for e in errors), f"a rank finished without an error: {errors}"
    for r, e in enumerate(errors):
        assert (e["step"], e["type"]) == (at, "FloatingPointError"), f"rank {r}: {e['type']} at {e['step']}"
        assert "inverting on rank 1 failed" in e["message"] and e["message"] == errors[0]["message"]
    for r, rec in enumerate(ranks):
        assert torch.equal(rec["error"]["params"], rec["params"][at - 1]), f"rank {r}: parameters changed"
        assert not torch.equal(rec["params"][at - 1], rec["params"][AT - 1]), "steps after the launch did not train"
    assert_identical_replicas(ranks, failed=True)
