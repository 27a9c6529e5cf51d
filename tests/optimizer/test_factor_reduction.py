"""Bucket planning, the reducer's launch/commit/discard logic (one process), SP-NGD's skipped-step semantics,
checkpoint shard merging, and the computed factor-traffic ratios of the CNN and ResNet-18.

Multi-rank behaviour (owners, reduce, overlap, ZeRO) is in test_distributed.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ds_spngd import SPNGD
from ds_spngd.comm.factor_reduction import FactorReducer, factor_traffic_bytes, plan_buckets
from ds_spngd.curvature.factor import SymmetricFactor
from ds_spngd_lab.models import build_model


def _factors(dims: list[int]) -> list[SymmetricFactor]:
    return [SymmetricFactor(f"f{i}", d) for i, d in enumerate(dims)]


@pytest.mark.parametrize("cap", [1, 10, 60, 100, 10_000])
def test_plan_buckets_partition_owner_and_cap(cap: int) -> None:
    factors = _factors([4, 10, 3, 1, 7, 2, 12, 5])  # packed sizes 10, 55, 6, 1, 28, 3, 78, 15
    owners = [0, 1, 0, 2, 1, 0, 2, 0]
    buckets = plan_buckets(factors, owners, cap)
    seen = [f.name for b in buckets for f in b.factors]
    assert sorted(seen) == sorted(f.name for f in factors)  # every factor exactly once
    for b in buckets:
        assert {owners[factors.index(f)] for f in b.factors} == {b.owner}
        assert b.numel == sum(f.packed_numel for f in b.factors)
        assert b.numel <= cap or len(b.factors) == 1  # only a factor larger than the cap travels alone over it
        pos = [factors.index(f) for f in b.factors]
        assert pos == sorted(pos)  # packing keeps the readiness order
    if cap == 1:
        assert len(buckets) == len(factors) and [b.factors[0] for b in buckets] == factors
    if cap == 10_000:
        assert [b.owner for b in buckets] == [1, 2, 0]  # by the position of their last factor: 4, 6, 7


def test_plan_buckets_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="capacity"):
        plan_buckets(_factors([2]), [0], 0)
    with pytest.raises(ValueError, match="owners"):
        plan_buckets(_factors([2, 3]), [0], 10)


def test_reducer_orders_forward_factors_first_and_backward_reversed() -> None:
    fs = [SymmetricFactor("l1.A", 3, final_in="forward"), SymmetricFactor("l1.G", 2),
          SymmetricFactor("l2.A", 3, final_in="forward"), SymmetricFactor("l2.G", 2)]
    r = FactorReducer(fs, [0, 0, 0, 0], bucket_cap_bytes=1)
    assert [b.factors[0].name for b in r.buckets] == ["l1.A", "l2.A", "l2.G", "l1.G"]


def _finish(r: FactorReducer, decay: float) -> tuple[list[float], list[float], list[float]]:
    """What the optimizer does at world size 1: complete, (no other rank to agree with), commit, settle."""
    had, late, bad = (v.tolist() for v in r.complete())
    r.commit(had, decay)
    r.settle()
    return had, late, bad


def test_reducer_launches_final_buckets_early_and_commits_the_mean() -> None:
    """World 1: after the learning step, a bucket leaves as soon as its factors got their last contribution; the
    committed estimate is the per-example mean; an extra contribution after the launch is reported (not raised in
    the hook, where only this rank would stop) and belongs to no step."""
    gen = torch.Generator().manual_seed(0)
    fs = [SymmetricFactor("a", 3, final_in="forward"), SymmetricFactor("g", 2)]
    r = FactorReducer(fs, [0, 0], bucket_cap_bytes=1)
    rows = [torch.randn(4, 3, generator=gen), torch.randn(4, 2, generator=gen)]
    for _ in range(2):  # learning step: two micro-batches
        fs[0].add(rows[0], 1.0, 4)
        fs[1].add(rows[1], 0.5, 4)
    assert _finish(r, 0.0) == ([1.0, 1.0], [0.0, 0.0], [0.0, 0.0])
    assert r.stats["buckets_early"] == 0
    torch.testing.assert_close(fs[0].value[0], rows[0].t() @ rows[0] / 4)
    torch.testing.assert_close(fs[1].value[0], 0.5 * rows[1].t() @ rows[1] / 4)
    fs[0].add(rows[0], 1.0, 4)
    assert not r.in_flight
    fs[0].add(2 * rows[0], 1.0, 4)  # second (last) contribution: bucket "a" leaves now
    assert r.in_flight
    fs[1].add(rows[1], 1.0, 4)
    fs[1].add(rows[1], 1.0, 4)
    assert _finish(r, 0.5)[1] == [0.0, 0.0]
    assert r.stats["buckets_early"] == 2
    a_new = (rows[0].t() @ rows[0] + 4 * rows[0].t() @ rows[0]) / 8
    torch.testing.assert_close(fs[0].value[0], 0.5 * rows[0].t() @ rows[0] / 4 + 0.5 * a_new)
    a_value = fs[0].value.clone()
    for _ in range(2):
        fs[0].add(rows[0], 1.0, 4)
    fs[0].add(rows[0], 1.0, 4)  # a third contribution after "a" left: reported as late
    assert fs[0].accum is not None
    had, late, bad = (v.tolist() for v in r.complete())
    assert late == [1.0, 0.0] and bad == [0.0, 0.0]
    assert fs[0].accum is None  # the late contribution is dropped, not carried into the next step
    assert torch.equal(fs[0].value, a_value)  # nothing committed without the caller's commit


def test_reducer_reports_non_finite_sums_rolls_back_and_discards() -> None:
    """A NaN/Inf reduced factor is flagged (on its owner) instead of raised; a commit can be rolled back exactly; a
    discarded step (DeepSpeed's overflow skip) leaves the factor as it was."""
    f = SymmetricFactor("a", 2)
    r = FactorReducer([f], [0])
    f.add(torch.ones(3, 2), 1.0, 3)
    _finish(r, 0.9)
    value, version = f.value.clone(), f.version
    f.add(torch.full((3, 2), float("inf")), 1.0, 3)
    had, late, bad = (v.tolist() for v in r.complete())
    assert bad == [1.0] and had == [1.0] and late == [0.0]
    assert torch.equal(f.value, value) and f.version == version and f.accum is None
    f.add(2 * torch.ones(3, 2), 1.0, 3)
    had, _, _ = (v.tolist() for v in r.complete())
    r.commit(had, 0.5)
    assert f.version == version + 1 and not torch.equal(f.value, value)
    r.rollback()
    assert torch.equal(f.value, value) and f.version == version
    f.add(torch.full((3, 2), float("inf")), 1.0, 3)
    r.discard()
    assert torch.equal(f.value, value) and f.version == version and f.accum is None


@pytest.mark.parametrize(("name", "size", "channels"), [("cnn4", 28, 1), ("resnet18", 224, 3)])
def test_factor_traffic_ratios(name: str, size: int, channels: int) -> None:
    """Issue acceptance, computed: packed fp32 ≤ 0.55× and packed half ≤ 0.28× a dense fp32 all-reduce."""
    model = build_model(name, 10 if name == "cnn4" else 1000, channels, size)
    opt = SPNGD(model.parameters(), model=model)
    factors = [f for b in opt.blocks for f in b.factors]
    packed, dense = factor_traffic_bytes(factors, torch.float32)
    half, _ = factor_traffic_bytes(factors, torch.bfloat16)
    assert dense == sum(4 * f.blocks * f.dim**2 for f in factors)
    assert 0.5 <= packed / dense <= 0.55
    assert 0.25 <= half / dense <= 0.28


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _step(m: nn.Module, opt: SPNGD, x: torch.Tensor, y: torch.Tensor, apply: bool = True) -> None:
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    if apply:
        opt.step()
    else:
        opt.discard_step()  # what ds_spngd's engine.step wrapper does when DeepSpeed skips the step (fp16 overflow)


def test_skipped_step_leaves_everything_as_it_was() -> None:
    """A step DeepSpeed skips (fp16 overflow): factors, preconditioners, momentum and counters stay as they were,
    and the run continues exactly as one that never saw the skipped batch."""
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(4)]
    torch.manual_seed(0)
    m1 = _Net()
    m2 = copy.deepcopy(m1)
    cfg = {"lr": 0.1, "momentum": 0.9, "factor_decay": 0.5, "damping": 0.05}
    o1, o2 = SPNGD(m1.parameters(), model=m1, config=cfg), SPNGD(m2.parameters(), model=m2, config=cfg)
    for b in batches[:2]:
        _step(m1, o1, *b)
        _step(m2, o2, *b)
    factors = {f.name: (f.value.clone(), f.version) for blk in o2.blocks for f in blk.factors}
    momentum = {k: v["momentum_buffer"].clone() for k, v in o2.state.items()}
    params, steps = [p.detach().clone() for p in m2.parameters()], o2.steps
    _step(m2, o2, batches[2][0] * 1e3, batches[2][1], apply=False)  # the "overflowing" batch
    assert o2.steps == steps
    assert all(torch.equal(f.value, factors[f.name][0]) and f.version == factors[f.name][1]
               for blk in o2.blocks for f in blk.factors)
    assert all(torch.equal(v["momentum_buffer"], momentum[k]) for k, v in o2.state.items())
    assert all(torch.equal(p, q) for p, q in zip(m2.parameters(), params, strict=True))
    _step(m1, o1, *batches[3])
    _step(m2, o2, *batches[3])
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_sharded_state_merges_owned_factors() -> None:
    """Each rank's shard holds the factors it owns; loading all shards restores every block (any world size)."""
    torch.manual_seed(2)
    m = _Net()
    opt = SPNGD(m.parameters(), model=m, config={"lr": 0.1})
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    _step(m, opt, x, y)
    full = opt.spngd_state()
    shard0, shard1 = copy.deepcopy(full), copy.deepcopy(full)
    for name, f in (("fc1", "fc1.A"), ("fc1", "fc1.G")):
        shard1["blocks"][name][f]["value"] = None  # rank 1 does not own fc1
    for name, f in (("fc2", "fc2.A"), ("fc2", "fc2.G")):
        shard0["blocks"][name][f]["value"] = None
    shard0["blocks"]["fc2"]["preconditioner"] = None  # mem_opt: rank 0 does not hold fc2's inverse
    torch.manual_seed(2)
    m2 = _Net()
    opt2 = SPNGD(m2.parameters(), model=m2, config={"lr": 0.1})
    opt2.load_sharded_state([shard0, shard1])
    assert opt2.steps == opt.steps
    for b, b2 in zip(opt.blocks, opt2.blocks, strict=True):
        assert b2.has_preconditioner and b2.holds_preconditioner
        for f, f2 in zip(b.factors, b2.factors, strict=True):
            assert torch.equal(f.value, f2.value) and f.version == f2.version
    bad = copy.deepcopy(shard1)
    bad["steps"] = 7
    with pytest.raises(ValueError, match="different steps"):
        opt2.load_sharded_state([shard0, bad])


def test_fp16_payload_overflow_is_named_with_the_fix() -> None:
    """Inputs of magnitude 1e3 make A's entries ~1e6: finite in fp32, Inf in an fp16 payload (max 65504). The agreed
    error names the factor and says to use bf16; with a bf16 payload the same step runs."""
    gen = torch.Generator().manual_seed(3)
    x, y = 1e3 * torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    for dtype in ("fp16", "bf16"):
        torch.manual_seed(0)
        m = _Net()
        m.forward = lambda x, m=m: m.fc2(m.fc1(x))  # type: ignore[method-assign]  # no tanh: fc1's gradient lives
        opt = SPNGD(m.parameters(), model=m, config={"lr": 0.1, "comm_dtype": dtype})
        F.cross_entropy(m(x), y).backward()
        if dtype == "fp16":
            with pytest.raises(FloatingPointError, match=r"fc1\.A.*use comm_dtype bf16"):
                opt.step()
        else:
            opt.step()
            assert all(torch.isfinite(p).all() for p in m.parameters())
