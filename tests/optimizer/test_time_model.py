"""The step-time model (:mod:`ds_spngd.time_model`): SGD's step when there is no curvature work, linear in every
FLOP and byte count, a hand-computed example, the statistics FLOPs of small layers by hand, and the calibrations."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from ds_spngd import SPNGD
from ds_spngd.cost_model import CostSettings, ModeCost, mode_costs
from ds_spngd.time_model import (
    MachineRates,
    calibration_dims,
    compute_time,
    measure_bandwidth,
    measure_gemm_rate,
    measure_inversion_rate,
    positions_per_example,
    predict_step_time,
    statistics_flops,
)

RATES = MachineRates(gemm_flops=1e9, inversion_flops=5e8, bytes_per_s=1e8)


def _cost(mode: str, step: float = 1e6, refresh: float = 0.0, inversion: float = 0.0, pre: float = 0.0,
          inv: float = 0.0, k_f: int = 10, k_inv: int = 10, world: int = 2) -> ModeCost:
    return ModeCost(mode, world, step, refresh, inversion, k_f, k_inv, pre, inv, 1.0, 1.0, world)


def _tiny_costs() -> dict[str, ModeCost]:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = SPNGD(model.parameters(), model=model, config={"comm_dtype": "fp32"})
    try:
        return mode_costs(opt.blocks, 26, 2, CostSettings(factor_bytes=4, factor_update_steps=2, inv_update_steps=4))
    finally:
        opt.remove_hooks()


def test_no_curvature_work_predicts_the_sgd_step() -> None:
    costs = _tiny_costs()
    compute = compute_time(0.25, costs["sgd"], RATES)
    assert predict_step_time(costs["sgd"], compute, 1e12, RATES).total_s == pytest.approx(0.25)  # S ignored for sgd
    assert compute == pytest.approx(0.25 - costs["sgd"].amortized_bytes / RATES.bytes_per_s)
    idle = dataclasses.replace(costs["comm_opt"], refresh_bytes=0.0, inversion_bytes=0.0, precondition_flops=0.0,
                               inversion_flops=0.0)
    assert predict_step_time(idle, compute, 0.0, RATES).total_s == pytest.approx(0.25)


def test_linear_in_every_count() -> None:
    base = _cost("comm_opt", pre=1e8, inv=2e9)
    t0 = predict_step_time(base, 0.1, 3e9, RATES).total_s
    doubled_pre = predict_step_time(dataclasses.replace(base, precondition_flops=2e8), 0.1, 3e9, RATES).total_s
    assert doubled_pre - t0 == pytest.approx(1e8 / RATES.gemm_flops)
    doubled_inv = predict_step_time(dataclasses.replace(base, inversion_flops=4e9), 0.1, 3e9, RATES).total_s
    assert doubled_inv - t0 == pytest.approx(2e9 / 10 / RATES.inversion_flops)
    doubled_stats = predict_step_time(base, 0.1, 6e9, RATES).total_s
    assert doubled_stats - t0 == pytest.approx(3e9 / 10 / RATES.gemm_flops)
    doubled_bytes = predict_step_time(dataclasses.replace(base, step_bytes=2e6), 0.1, 3e9, RATES).total_s
    assert doubled_bytes - t0 == pytest.approx(1e6 / RATES.bytes_per_s)
    twice_as_fast = MachineRates(2e9, 1e9, 2e8)
    extra = t0 - 0.1
    assert predict_step_time(base, 0.1, 3e9, twice_as_fast).total_s - 0.1 == pytest.approx(extra / 2)


def test_hand_computed_example() -> None:
    # measured SGD 100 ms at 2 ranks, 1 MB all-reduced per step at 100 MB/s: compute 90 ms
    compute = compute_time(0.1, _cost("sgd", step=1e6), RATES)
    assert compute == pytest.approx(0.09)
    # bytes 1e6 + 2e6/10 + 4e6/10 = 1.6e6 → 16 ms; statistics 5e8/10 at 1 GFLOP/s → 50 ms; preconditioning 2e7 at
    # 1 GFLOP/s → 20 ms; inversion 1e9/10 at 0.5 GFLOP/s → 200 ms
    t = predict_step_time(_cost("mem_opt", refresh=2e6, inversion=4e6, pre=2e7, inv=1e9), compute, 5e8, RATES)
    assert (t.comm_s, t.statistics_s, t.precondition_s, t.inversion_s) == pytest.approx((0.016, 0.05, 0.02, 0.2))
    assert t.total_s == pytest.approx(0.376)
    assert t.mode == "mem_opt" and t.world == 2


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="sgd cost"):
        compute_time(0.1, _cost("comm_opt"), RATES)
    with pytest.raises(ValueError, match="positive"):
        compute_time(0.0, _cost("sgd"), RATES)
    with pytest.raises(ValueError, match="rates"):
        predict_step_time(_cost("sgd"), 0.1, 0.0, MachineRates(0.0, 1.0, 1.0))


def test_statistics_flops_by_hand() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = SPNGD(model.parameters(), model=model)
    try:
        pos = positions_per_example(model, torch.zeros(5, 3))
        assert pos == {"0": 1, "2": 1}
        # m = ⌈0.25·8⌉ = 2 examples; A1 4×4 (bias), G1 4×4, A2 5×5, G2 2×2: 2·2·(16 + 16 + 25 + 4) = 244
        assert statistics_flops(opt.blocks, pos, 8, 0.25) == pytest.approx(244.0)
    finally:
        opt.remove_hooks()


def _conv_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(75, 2, bias=False))


def test_statistics_flops_conv_and_sequence_positions() -> None:
    with torch.device("meta"):  # shapes only: nothing allocated
        assert positions_per_example(_conv_model(), torch.empty(1, 2, 5, 5)) == {"0": 25, "2": 1}
    conv = _conv_model()
    opt = SPNGD(conv.parameters(), model=conv)
    try:
        # conv: T = 25, d_A = 2·3·3 + 1 = 19, d_G = 3; linear: d_A = 75, d_G = 2; m = 4
        expected = 2.0 * 4 * 25 * (19**2 + 3**2) + 2.0 * 4 * (75**2 + 2**2)
        assert statistics_flops(opt.blocks, {"0": 25, "2": 1}, 4) == pytest.approx(expected)
    finally:
        opt.remove_hooks()
    seq = nn.Sequential(nn.Linear(3, 4, bias=False))
    assert positions_per_example(seq, torch.zeros(2, 7, 3)) == {"0": 7}
    for approx, t in (("expand", 7), ("reduce", 1)):
        opt = SPNGD(seq.parameters(), model=seq, config={"kfac_approx": approx})
        try:
            assert statistics_flops(opt.blocks, {"0": 7}, 2) == pytest.approx(2.0 * 2 * t * (9 + 16))
        finally:
            opt.remove_hooks()


def test_statistics_flops_chunked_and_diagonal_sides() -> None:
    model = nn.Sequential(nn.Linear(8, 6, bias=False))
    for method, expected in (("block", 2.0 * (2 * 4**2 + 2 * 3**2)), ("diagonal", 2.0 * (8 + 6))):
        opt = SPNGD(model.parameters(), model=model, config={"max_factor_dim": 4, "large_dim_method": method})
        try:
            assert statistics_flops(opt.blocks, {"0": 1}, 1) == pytest.approx(expected)
        finally:
            opt.remove_hooks()


def test_calibrations_measure_positive_rates() -> None:
    assert measure_gemm_rate(size=64, repeats=1) > 0
    assert measure_inversion_rate(size=64, method="inverse", repeats=1) > 0
    assert measure_inversion_rate(size=64, method="eigen", repeats=1) > 0
    with pytest.raises(ValueError, match="inverse_method"):
        measure_inversion_rate(size=8, method="svd")
    assert measure_bandwidth(numel=16) == math.inf  # no process group here, or one rank: nothing is sent


def test_positions_run_in_eval_mode_and_restore_it() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3, 2))
    model[3].eval()  # a mixed state comes back as it was
    with torch.device("meta"):  # BatchNorm in training mode would refuse one value per channel
        assert positions_per_example(model.to("meta"), torch.empty(1, 2, 1, 1)) == {"0": 1, "3": 1}
    assert [m.training for m in model.modules()] == [True, True, True, True, False]


def test_calibration_dims_are_flop_weighted_medians() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = SPNGD(model.parameters(), model=model)
    try:
        # sides applied (b, 2·b²·n): G1 (4, 128), A1 (4, 128), G2 (2, 40), A2 (5, 100): half of 396 is reached at 4;
        # inverted pieces (b, b³): A1 (4, 64), G1 (4, 64), A2 (5, 125), G2 is 2×2 (closed form, left out): 4
        assert calibration_dims(opt.blocks, floor=1) == (4, 4)
        assert calibration_dims(opt.blocks) == (64, 64)  # the floor
        assert calibration_dims(opt.blocks, floor=1, cap=3) == (3, 3)
    finally:
        opt.remove_hooks()
