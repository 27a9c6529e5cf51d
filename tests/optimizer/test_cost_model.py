"""The communication / FLOP cost model (:mod:`ds_spngd.cost_model`) against hand calculations.

Tiny model: nn.Sequential(Linear(3, 4), ReLU, Linear(4, 2)) at 2 ranks, every figure worked out by hand below. Real
shapes (ResNet-50 and GPT-2-small on the meta device): SGD's bytes from the published parameter counts, and the
``reduce_scatter`` mode ≈ SGD's all-reduce + the factor reduction, with the stated tolerance.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ds_spngd import SPNGD
from ds_spngd.comm.inversion import plan_parts
from ds_spngd.cost_model import (
    INVERSE_FLOPS_PER_D3,
    CostSettings,
    mode_costs,
    payloads,
    precondition_flops,
)
from ds_spngd_lab.models import build_model


def _opt(model: nn.Module, **config: object) -> SPNGD:
    return SPNGD(model.parameters(), model=model, config={"comm_dtype": "bf16", **config})


def test_tiny_model_by_hand() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = _opt(model)
    try:
        settings = CostSettings(grad_bytes=4, factor_bytes=2, factor_update_steps=2, inv_update_steps=4)
        c = mode_costs(opt.blocks, 26, 2, settings)
        # P = 3·4 + 4 + 4·2 + 2 = 26 fp32 gradients; ring all-reduce at W = 2: 2·(1/2)·26·4 = 104 bytes per rank
        assert c["sgd"].step_bytes == pytest.approx(104.0)
        assert c["sgd"].amortized_bytes == pytest.approx(104.0)
        # factors (bias appended to A): A1 4×4, G1 4×4, A2 5×5, G2 2×2 → packed 10 + 10 + 15 + 3 = 38 bf16 values
        # = 76 bytes; a reduce counted as a reduce-scatter: (1/2)·76 = 38 bytes per rank per refresh step
        assert c["comm_opt"].refresh_bytes == pytest.approx(38.0)
        # preconditioners (fp32, every part broadcast in comm_opt): 16 + 16 + 25 + 4 = 61 floats = 244 bytes; a
        # broadcast counted as scatter + all-gather (the ring model of ds_spngd.comm.wire): (1/2)·244 = 122 bytes
        assert c["comm_opt"].inversion_bytes == pytest.approx(122.0)
        assert c["comm_opt"].amortized_bytes == pytest.approx(104.0 + 38.0 / 2 + 122.0 / 4)
        assert c["comm_opt"].peak_bytes == pytest.approx(104.0 + 38.0 + 122.0)
        # G⁻¹·V·A⁻¹ = 2·d_G·d_A·(d_G + d_A): layer 1: 2·4·4·8 = 256; layer 2: 2·2·5·7 = 140; every rank does both
        assert c["comm_opt"].precondition_flops == pytest.approx(396.0)
        # LPT over part costs Σ d³ (an unblocked layer is one part): layer 2 (125 + 8 = 133) → rank 0, layer 1
        # (64 + 64 = 128) → rank 1: block 0 on rank 1 (256 flops), block 1 on rank 0 (140 flops), no part moved
        plan = plan_parts(opt.blocks, 2)
        assert plan.owners == (1, 0) and plan.block_owners == (1, 0)
        assert c["mem_opt"].precondition_flops == pytest.approx(256.0)
        assert c["mem_opt"].inversion_bytes == 0.0
        # mem_opt: each of the 2 ranks broadcasts its directions and one fp32 partial: (26 + 2)·4 = 112 bytes of
        # payload, (1/2)·112 = 56 bytes sent per rank under the ring model
        assert c["mem_opt"].step_bytes == pytest.approx(104.0 + 56.0)
        # reduce_scatter: (1/2)·26·4 reduce-scatter + (1/2)·26·4 all-gather = 104: the bytes of the all-reduce
        assert c["reduce_scatter"].step_bytes == pytest.approx(104.0)
        assert c["reduce_scatter"].amortized_bytes == pytest.approx(104.0 + 38.0 / 2)
        # inversion (10/3)·d³ per factor: rank 0 (125 + 8)·10/3 = 443.3 > rank 1 (64 + 64)·10/3 = 426.7
        assert c["comm_opt"].inversion_flops == pytest.approx(133 * 10 / 3)
        assert c["comm_opt"].busy_ranks == 2
        assert c["comm_opt"].imbalance == pytest.approx(133 / 130.5)
        # one rank: nothing travels
        one = mode_costs(opt.blocks, 26, 1, settings)
        assert all(v.amortized_bytes == 0.0 for v in one.values())
        assert one["mem_opt"].precondition_flops == pytest.approx(396.0)
    finally:
        opt.remove_hooks()


def test_blocked_diagonal_eigen_and_unit_wise_flops() -> None:
    lin = nn.Sequential(nn.Linear(7, 9, bias=False))
    opt = _opt(lin, max_factor_dim=4, large_dim_method="block")
    try:
        # A side 7 → 2 blocks of 4 (padded 8), G side 9 → 3 blocks of 3: 2·3·3²·8 + 2·2·4²·9 = 432 + 576
        assert precondition_flops(opt.blocks[0]) == pytest.approx(1008.0)
    finally:
        opt.remove_hooks()
    opt = _opt(lin, max_factor_dim=4, large_dim_method="diagonal")
    try:
        assert precondition_flops(opt.blocks[0]) == pytest.approx(9 * 7 + 7 * 9)  # one multiply per element, twice
    finally:
        opt.remove_hooks()
    opt = _opt(nn.Sequential(nn.Linear(3, 4)))
    try:
        # eigen: both bases applied twice (2·256) plus the elementwise scale of the 4 × 4 matrix
        assert precondition_flops(opt.blocks[0], "eigen") == pytest.approx(2 * 256 + 16)
    finally:
        opt.remove_hooks()
    opt = _opt(nn.Sequential(nn.BatchNorm1d(5), nn.LayerNorm(6, bias=False)))
    try:
        assert [precondition_flops(b) for b in opt.blocks] == pytest.approx([2 * 4 * 5, 2 * 1 * 6])  # 2·k²·U
    finally:
        opt.remove_hooks()


def test_resnet50_reduce_scatter_is_sgd_plus_factors() -> None:
    """With grad and direction elements of one size, reduce_scatter = SGD's all-reduce + the factor reduction + the
    preconditioner parts moved to their block owners; the last term keeps it within 10% of the first two for
    ResNet-50 at 64 ranks (k = 10/10, bf16 factors)."""
    with torch.device("meta"):
        model = build_model("resnet50", num_classes=1000, in_channels=3, image_size=224)
    opt = _opt(model)
    try:
        p, w = 25_557_032, 64  # torchvision's ResNet-50 parameter count
        settings = CostSettings(grad_bytes=4, direction_bytes=4, factor_update_steps=10, inv_update_steps=10)
        c = mode_costs(opt.blocks, p, w, settings)
        assert c["sgd"].amortized_bytes == pytest.approx(2 * 63 / 64 * p * 4)
        factors = sum(f.blocks * f.dim * (f.dim + 1) // 2 for b in opt.blocks for f in b.factors)
        base = c["sgd"].amortized_bytes + 63 / 64 * factors * 2 / 10
        moved = 63 / 64 * payloads(opt.blocks, p, plan_parts(opt.blocks, w)).moved_precond_numel * 4 / 10
        assert c["reduce_scatter"].amortized_bytes == pytest.approx(base + moved)
        assert 1.0 <= c["reduce_scatter"].amortized_bytes / base <= 1.10
        assert c["reduce_scatter"].amortized_bytes < c["comm_opt"].amortized_bytes < c["mem_opt"].amortized_bytes
    finally:
        opt.remove_hooks()


def test_gpt2_busiest_rank_and_idle_ranks() -> None:
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768,
                                                                     n_layer=12, n_head=12))
    opt = _opt(model, max_factor_dim=4096, large_dim_method="block")
    try:
        p = 124_439_808  # GPT-2 small, tied embedding counted once
        c = mode_costs(opt.blocks, p, 1024, CostSettings(grad_bytes=2, factor_update_steps=3, inv_update_steps=3))
        assert c["sgd"].step_bytes == pytest.approx(2 * 1023 / 1024 * p * 2)
        parts = sum(len(b.parts()) for b in opt.blocks)
        assert c["comm_opt"].busy_ranks == parts < 1024  # most ranks own nothing
        # the tied output layer: V-side 13 blocks of 3866 (padded 50258), d-side 768 dense
        lm_head = 2 * 13 * 3866**2 * 768 + 2 * 768**2 * 50258
        assert c["mem_opt"].precondition_flops == pytest.approx(lm_head)  # its block owner is the busiest rank
        # one 3866² V-side part is the largest inversion: a rank with only that part is the busiest at 1024 ranks
        assert c["mem_opt"].inversion_flops == pytest.approx(INVERSE_FLOPS_PER_D3 * 3866**3)
        assert c["comm_opt"].precondition_flops > 2.5 * lm_head  # every rank preconditions all 75 blocks
    finally:
        opt.remove_hooks()
