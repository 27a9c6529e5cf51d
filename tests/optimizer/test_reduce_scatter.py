"""``precondition_mode: "reduce_scatter"`` (SP-NGD's own schedule, Osawa et al. 2019 §4) through the real DeepSpeed
engine (gloo, CPU, ZeRO 0): DeepSpeed's gradient all-reduce is off, each block's gradient is reduced to its owner
during the backward pass, the owner preconditions it and broadcasts the result.

* the update equals the 1-rank run (which equals comm_opt by construction) on 2 and 3 ranks: fp32, gradient
  accumulation, eigen, KL-clip + rescaling, bf16, without overlap, blocked layers (parts with several owners), a
  checkpoint round trip, a module used on one rank only (against comm_opt on 2 ranks);
* every rank issues the same collectives; no DeepSpeed all-reduce of the gradients; the bytes handed to collectives
  on a step without factor refresh or inversion are within 10% of two gradient payloads (a reduce and a broadcast:
  the payload of one ring all-reduce, :mod:`ds_spngd.comm.wire`), i.e. the bytes of SGD's all-reduce;
* a NaN gradient on one rank skips the step on every rank (nothing updated), after which training goes on;
* refused with ZeRO 1/2 and with the gradient noise scale, naming the keys.
"""

from __future__ import annotations

import pytest
import torch

import ds_spngd
from ds_spngd.comm.wire import ring_bytes
from ds_spngd.config import SPNGDConfigError
from tests.support.ranks import launch

BASE = {"gas": 1, "bf16": False, "inverse_method": "inverse", "steps": 6}
RS = {**BASE, "mode": "reduce_scatter"}
FULL = {"steps": 8, "kl_clip": 0.05, "weight_rescale": True}
CASES = {
    "rs": RS,
    "rs_gas2": {**RS, "gas": 2},
    "rs_eigen": {**RS, "inverse_method": "eigen"},
    "rs_full": {**RS, **FULL},
    "rs_bf16": {**RS, "bf16": True, "damping": 0.3},
    "rs_no_overlap": {**RS, "overlap": False, "bucket_cap_mb": 1e-3},
    "rs_blocked": {**RS, "max_factor_dim": 6},
    "rs_count": {**RS, "count_collectives": True, "inv_update_steps": 3},
    "comm_count": {**BASE, "count_collectives": True, "inv_update_steps": 3},
    "rs_resume": {**RS, **FULL, "resume_at": 4},  # checkpoint after 4 steps, a fresh engine, load, go on
    "rs_rank0": {**RS, "extra": "rank0"},
    "comm_rank0": {**BASE, "extra": "rank0"},  # its reference: the module's hooks fire on rank 0 only
    "rs_skip": {**RS, "nonfinite": "skip", "inject": {"kind": "grad", "rank": 1, "step": 3}},
    # one bucket per block, and the first to launch holds a layer with no gradient on rank 1: rank 1's hooks launch
    # nothing, rank 0's launch everything; the skipped step must still complete every bucket on both
    "rs_skip_unlaunched": {**RS, "extra": "rank0_nograd", "bucket_cap_mb": 1e-6, "nonfinite": "skip",
                           "inject": {"kind": "grad", "rank": 1, "step": 3}},
    "comm_unlaunched_omit3": {**BASE, "extra": "rank0_nograd", "omit": [3]},
}
REFS = {"rs": (1, "ref"), "rs_gas2": (1, "ref"), "rs_eigen": (1, "eigen"), "rs_full": (1, "full"),
        "rs_bf16": (1, "bf16"), "rs_no_overlap": (1, "ref"), "rs_blocked": (1, "blocked"),
        "rs_resume": (1, "full"), "rs_rank0": (2, "comm_rank0")}
ONE = {"ref": BASE, "eigen": {**BASE, "inverse_method": "eigen"}, "full": {**BASE, **FULL},
       "bf16": {**BASE, "bf16": True, "damping": 0.3}, "blocked": {**BASE, "max_factor_dim": 6},
       "omit3": {**BASE, "omit": [3]}, "rs1": RS}
THREE = ["rs", "rs_gas2", "rs_full", "rs_blocked", "rs_bf16"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, dict]]:
    base = tmp_path_factory.mktemp("rs")
    out = {}
    for world, cases in ((1, ONE), (2, {k: CASES[k] for k in CASES}), (3, {k: CASES[k] for k in THREE})):
        names = list(cases)
        out[world] = dict(zip(names, launch(world, [cases[n] for n in names], base / f"w{world}"), strict=True))
    return out


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    torch.testing.assert_close(b, a, rtol=0.0, atol=rtol * float(a.abs().max()))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(REFS))
def test_reduce_scatter_equals_one_rank(runs: dict, name: str, world: int) -> None:
    if name not in runs[world]:
        pytest.skip(f"{name} runs on 2 ranks only")
    got = runs[world][name]
    assert all(rec["error"] is None for rec in got["ranks"]), [rec["error"] for rec in got["ranks"]]
    tol = 5e-5 if "eigen" in name else 2e-2 if "bf16" in name else 2e-5
    ref_world, ref_name = REFS[name]
    _close(runs[ref_world][ref_name]["params"], got["params"], tol)
    for rec in got["ranks"][1:]:  # identical replicas, bit for bit
        assert all(torch.equal(a, b) for a, b in zip(rec["params"], got["ranks"][0]["params"], strict=True))
    stats = got["stats"][0]
    assert all(s.get("grad_bytes", 0.0) > 0 for s in stats), "the gradients did not go through SP-NGD's reducer"


def test_one_rank_is_comm_opt(runs: dict) -> None:
    """On one rank there is nothing to reduce: the mode is the plain step, bit for bit."""
    assert all(torch.equal(a, b) for a, b in zip(runs[1]["rs1"]["params"], runs[1]["ref"]["params"], strict=True))


def test_buckets_launch_from_the_backward(runs: dict) -> None:
    overlap = [s["grad_buckets_early"] for s in runs[2]["rs"]["stats"][0]]
    assert all(n >= 1 for n in overlap), overlap
    assert all(s["grad_buckets_early"] == 0 for s in runs[2]["rs_no_overlap"]["stats"][0])
    assert all(s["grad_buckets"] >= 2 for s in runs[2]["rs_no_overlap"]["stats"][0])  # the tiny cap splits them


def test_same_collectives_and_one_all_reduce_worth_of_bytes(runs: dict) -> None:
    """Per step without inversion: rs sends (ring model) ≤ 1.1 × (SGD's gradient all-reduce + the packed factors
    actually reduced), and DeepSpeed's gradient all-reduce is gone; comm_opt, for contrast, sends both."""
    rs, comm = runs[2]["rs_count"], runs[2]["comm_count"]
    assert rs["ranks"][0]["collectives"] == rs["ranks"][1]["collectives"]
    n_params = rs["ranks"][0]["params"][0].numel()
    sgd_wire = ring_bytes("all_reduce", 4 * n_params, 2)
    for step in (1, 2, 4, 5):  # not inversion steps (inv_update_steps 3); every step refreshes factors
        for run, is_rs in ((rs, True), (comm, False)):
            calls = run["ranks"][0]["collectives"][step]
            grad_all_reduce = [c for c in calls if c[0] == "all_reduce" and c[1] == n_params]
            assert len(grad_all_reduce) == (0 if is_rs else 1), calls
            factor_wire = ring_bytes("reduce", int(run["stats"][0][step]["factor_bytes"]), 2)
            wire = sum(ring_bytes(k, b, 2) for k, _, b in calls)
            if is_rs:
                assert sum(b for k, _, b in calls if k == "reduce") >= 4 * n_params  # gradients to their owners
                assert wire <= 1.1 * (sgd_wire + factor_wire), (wire, sgd_wire, factor_wire, calls)
            assert wire >= sgd_wire + factor_wire, (wire, sgd_wire, factor_wire, calls)


@pytest.mark.parametrize(("name", "ref"), [("rs_skip", (1, "omit3")),
                                         ("rs_skip_unlaunched", (2, "comm_unlaunched_omit3"))])
def test_nan_gradient_on_one_rank_skips_the_step_everywhere(runs: dict, name: str, ref: tuple[int, str]) -> None:
    ranks = runs[2][name]["ranks"]
    assert all(rec["error"] is None for rec in ranks), [rec["error"] for rec in ranks]
    assert all(rec["skipped"][-1] == 1 for rec in ranks)
    _close(runs[ref[0]][ref[1]]["params"], runs[2][name]["params"], 2e-5)  # as if step 3's batch was never seen


def test_refused_with_zero_1_2_and_noise_scale() -> None:
    model = torch.nn.Linear(3, 2)
    for extra, key in (({"zero_optimization": {"stage": 2}}, "zero_optimization.stage=0"),
                       ({"gradient_noise_scale": {"enabled": True}}, "gradient_noise_scale.enabled")):
        cfg = {"train_batch_size": 4, "optimizer": {"type": "SPNGD", "params": {"precondition_mode": "reduce_scatter"}},
               **extra}
        with pytest.raises(SPNGDConfigError) as err:
            ds_spngd.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        assert key in str(err.value) and "reduce_scatter" in str(err.value)


def test_ring_model_by_hand() -> None:
    """All-reduce 2(W−1)/W·n; reduce / broadcast / all-gather / reduce-scatter (W−1)/W·n; nothing on one rank."""
    assert ring_bytes("all_reduce", 100, 4) == 150.0
    assert ring_bytes("reduce", 100, 4) == ring_bytes("broadcast", 100, 4) == 75.0
    assert ring_bytes("all_gather_into_tensor", 100, 2) == ring_bytes("reduce_scatter_tensor", 100, 2) == 50.0
    assert ring_bytes("all_reduce", 100, 1) == 0.0
    with pytest.raises(ValueError, match="unknown collective"):
        ring_bytes("gather", 1, 2)


def test_record_collectives_logs_payloads(single_rank_env: None) -> None:
    import torch.distributed as dist

    from ds_spngd.comm.wire import record_collectives

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    real = dist.all_reduce
    with record_collectives() as log:
        dist.all_reduce(torch.ones(3))
        dist.broadcast(torch.ones(2, dtype=torch.bfloat16), 0)
        out = torch.zeros(4)
        dist.all_gather_single(out, torch.ones(4))
    assert dist.all_reduce is real  # restored
    assert log.calls == [("all_reduce", 12, 1), ("broadcast", 4, 1), ("all_gather_single", 16, 1)]
    assert log.payload_bytes() == 32 and log.wire_bytes() == 0.0
