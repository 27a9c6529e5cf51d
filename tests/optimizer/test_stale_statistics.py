"""Stale statistics (``stale_statistics``; :mod:`ds_spngd.staleness`): the interval rule, the reduced-sum form of the
relative change, the due set in the reducer and the hooks, checkpointing, equality with the fixed schedule at
tolerance 0, and — on 2 gloo ranks that see different data — identical due sets, intervals, collectives and
parameters on every rank.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ds_spngd import SPNGD
from ds_spngd.comm.factor_reduction import FactorReducer
from ds_spngd.curvature.factor import SymmetricFactor
from ds_spngd.staleness import next_interval, relative_change
from tests.support.ranks import assert_identical_replicas, launch


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(n)]


def _train(model: nn.Module, opt: SPNGD, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[dict]:
    seen = []
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        seen.append({"intervals": opt.refresh_intervals(), "stats": opt.last_stats})
    return seen


# ---- (1) the rule ---------------------------------------------------------------------------------------------------
def test_interval_rule_grows_caps_and_resets() -> None:
    """A synthetic factor sequence: tiny changes double the interval up to the cap, a large change resets it."""
    base = torch.eye(4) + 0.1
    values = [base, base * 1.001, base * 1.002, base * 0.999, base * 1.0, base * 3.0, base * 3.001]
    interval, got = 1, []
    for old, new in zip(values[:-1], values[1:], strict=True):
        # the reduced sums of one rank (n = k = 1, decay 0): T = new, D = T − F_old
        d = new - old
        change = relative_change(float((d * d).sum()), float((d * old).sum()), float((old * old).sum()), 1, 1, 0.0)
        assert change == pytest.approx(float((new - old).norm() / old.norm()), rel=1e-4)
        interval = next_interval(change, interval, tolerance=0.01, cap=4)
        got.append(interval)
    assert got == [2, 4, 4, 4, 1, 2]
    assert next_interval(None, 8, 0.5, 16) == 1  # first estimate: base interval
    assert next_interval(float("nan"), 4, 0.5, 16) == 1
    assert next_interval(0.0, 4, 0.0, 16) == 1  # tolerance 0 never grows
    assert next_interval(0.0, 1, 1.0, 1) == 1  # cap 1 never grows


def test_relative_change_from_reduced_sums_of_several_ranks() -> None:
    """T = Σ of the contributing ranks' means (3 of a world of 4, or all 4), decay 0.5: the change of the running
    average equals the direct computation."""
    torch.manual_seed(0)
    old = torch.randn(5, 5, dtype=torch.float64)
    old = old @ old.T
    for n in (3, 4):
        t = sum(old + 0.1 * torch.randn(5, 5, dtype=torch.float64) for _ in range(n))
        new = 0.5 * old + 0.5 * t / n
        want = float((new - old).norm() / old.norm())
        d = t - 4 * old
        got = relative_change(float((d * d).sum()), float((d * old).sum()), float((old * old).sum()), n, 4, 0.5)
        assert got == pytest.approx(want, rel=1e-6)
    assert relative_change(1.0, 1.0, 0.0, 3, 3, 0.0) is None and relative_change(1.0, 1.0, 1.0, 0, 3, 0.0) is None


# ---- the reducer's due set ------------------------------------------------------------------------------------------
def test_reducer_plans_only_due_factors_and_refuses_changes_mid_step() -> None:
    factors = [SymmetricFactor(f"f{i}", 3) for i in range(4)]
    red = FactorReducer(factors, [0] * 4, None, bucket_cap_bytes=1, overlap=False)  # one bucket per factor
    assert len(red.buckets) == 4
    red.set_due([True, False, True, False])
    assert sorted(f.name for b in red.buckets for f in b.factors) == ["f0", "f2"]
    assert len(red.all_buckets) == 4
    factors[0].add(torch.randn(5, 3), 1.0, 5)
    with pytest.raises(RuntimeError, match="due set"):
        red.set_due(None)
    had, _, _ = red.complete()
    assert had.tolist() == [1.0, 0.0, 0.0, 0.0]
    red.set_due(None)
    assert len(red.buckets) == 4


# ---- (3) tolerance 0 is the fixed schedule --------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [{"factor_update_steps": 1, "inv_update_steps": 1},
                                 {"factor_update_steps": 2, "inv_update_steps": 4}])
def test_tolerance_zero_equals_the_fixed_schedule(cfg: dict) -> None:
    batches = _batches(9)
    runs = []
    for extra in ({}, {"stale_statistics": True, "stale_tolerance": 0.0, "stale_max_interval": 8}):
        m = _net()
        opt = SPNGD(m.parameters(), model=m, config={"lr": 0.1, "factor_decay": 0.5, **cfg, **extra})
        seen = _train(m, opt, batches)
        runs.append((torch.cat([p.detach().reshape(-1) for p in m.parameters()]), seen))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(k == 1 for s in runs[1][1] for k in s["intervals"].values())
    assert [s["stats"]["refresh_fraction"] for s in runs[1][1]] == [s["stats"]["refresh_fraction"] for s in runs[0][1]]


# ---- (4) a factor that is not due does no work ----------------------------------------------------------------------
def test_factor_not_due_collects_nothing_and_keeps_its_preconditioner() -> None:
    """A huge tolerance doubles every interval (1, 2, 4): after the refreshes of steps 0 and 1 nothing is due on
    step 2, so no hook computes statistics and no block is re-inverted (same preconditioner objects)."""
    m = _net()
    opt = SPNGD(m.parameters(), model=m, config={"lr": 0.1, "stale_statistics": True, "stale_tolerance": 1e9,
                                                 "stale_max_interval": 4})
    batches = _batches(4)
    _train(m, opt, batches[:2])
    assert set(opt.refresh_intervals().values()) == {2}
    assert not any(opt.refresh.due) and not opt.ctx.collecting
    inverses = [b.preconditioner_tensors() for b in opt.blocks]
    x, y = batches[2]
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    assert all(f.accum is None and f.count == 0.0 for b in opt.blocks for f in b.factors)  # no statistics work
    opt.step()  # an inversion step (inv_update_steps 1): nothing changed, nothing is re-inverted
    assert opt.last_stats["refresh_fraction"] == 0.0 and opt.last_stats["refresh"] == 0.0
    same = [all(t is u for t, u in zip(b.preconditioner_tensors(), inv, strict=True))
            for b, inv in zip(opt.blocks, inverses, strict=True)]
    assert all(same)
    assert all(opt.refresh.due)  # step 3 = slot 3 = 1 + 2: every factor due again
    x, y = batches[3]
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    opt.step()
    assert opt.last_stats["refresh_fraction"] == 1.0 and opt.last_stats["refresh"] == 1.0  # every factor again
    assert not any(any(t is u for t, u in zip(b.preconditioner_tensors(), inv, strict=True))
                   for b, inv in zip(opt.blocks, inverses, strict=True))


def test_partial_due_set_refreshes_only_due_factors() -> None:
    """With a mid tolerance some factors are skipped on some steps: only the due ones change version, and the
    per-block fractions are in the stats."""
    m = _net()
    opt = SPNGD(m.parameters(), model=m, config={"lr": 0.1, "factor_decay": 0.0, "stale_statistics": True,
                                                 "stale_tolerance": 0.3, "stale_max_interval": 4})
    partial = 0
    for x, y in _batches(12):
        due = list(opt.refresh.due)
        before = [f.version for b in opt.blocks for f in b.factors]
        _train(m, opt, [(x, y)])
        after = [f.version for b in opt.blocks for f in b.factors]
        assert [a - b for a, b in zip(after, before, strict=True)] == [int(d) for d in due]
        assert opt.last_stats["refresh_fraction"] == pytest.approx(sum(due) / len(due))
        assert {f"refresh_fraction/{b.name}" for b in opt.blocks} <= set(opt.last_stats)
        partial += 0 < sum(due) < len(due)
    assert partial > 0  # the test exercised partial due sets


# ---- checkpoint -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", [3, 5])
def test_resume_continues_the_schedule_identically(split: int) -> None:
    cfg = {"lr": 0.1, "factor_decay": 0.0, "inv_update_steps": 2, "stale_statistics": True, "stale_tolerance": 0.3,
           "stale_max_interval": 4}
    batches = _batches(10)
    m = _net()
    opt = SPNGD(m.parameters(), model=m, config=cfg)
    _train(m, opt, batches[:split])
    saved = copy.deepcopy(opt.state_dict())
    m2 = _net()
    m2.load_state_dict(copy.deepcopy(m.state_dict()))
    want = _train(m, opt, batches[split:])
    opt2 = SPNGD(m2.parameters(), model=m2, config=cfg)
    opt2.load_state_dict(saved)
    got = _train(m2, opt2, batches[split:])
    assert [s["intervals"] for s in got] == [s["intervals"] for s in want]
    for p, q in zip(m.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


# ---- (2) two ranks that see different data --------------------------------------------------------------------------
STALE = {"gas": 1, "bf16": False, "inverse_method": "inverse", "steps": 14, "stale_statistics": True,
         "stale_tolerance": 0.25, "stale_max_interval": 4, "count_collectives": True}


def test_two_ranks_agree_on_due_sets_collectives_and_parameters(tmp_path: Path) -> None:
    """Each rank takes its own share of every global batch, so its local statistics (and local relative changes)
    differ from the other's; the due sets come from reduced sums only, so both ranks refresh the same factors, issue
    the same collectives (name and size, in order) and end with bitwise-equal parameters."""
    res = launch(2, [STALE, {**STALE, "overlap": False, "bucket_cap_mb": 1e-6}], tmp_path, timeout=120)
    for r in res:
        ranks = r["ranks"]
        assert_identical_replicas(ranks, steps=STALE["steps"])
        assert ranks[0]["intervals"] == ranks[1]["intervals"]
        assert ranks[0]["due"] == ranks[1]["due"]
        assert ranks[0]["collectives"] == ranks[1]["collectives"]
        fractions = [s["refresh_fraction"] for s in r["stats"][0]]
        assert fractions == [s["refresh_fraction"] for s in r["stats"][1]]
        assert any(0.0 < f < 1.0 for f in fractions)  # partial due sets happened (the test can fail)
        assert any(k > 1 for step in ranks[0]["intervals"] for k in step.values())
        assert len({tuple(c) for c in ranks[0]["collectives"]}) > 1  # the step's collectives follow the due set


def test_bucket_plan_cache_stays_bounded() -> None:
    """Every distinct due set gets a bucket plan; a long stale run makes many, and only the recent ones are kept
    (the all-factors plan stays). A re-planned due set still buckets exactly its due factors."""
    from ds_spngd.comm.factor_reduction import PLAN_CACHE

    factors = [SymmetricFactor(f"f{i}", 2) for i in range(7)]
    reducer = FactorReducer(factors, [0] * 7, bucket_cap_bytes=16)
    masks = [[bool((k >> i) & 1) or i == 0 for i in range(7)] for k in range(1, 2**6)]
    for mask in masks + masks[:5]:
        reducer.set_due(mask)
        planned = sorted(f.name for b in reducer.buckets for f in b.factors)
        assert planned == sorted(f.name for f, d in zip(factors, mask, strict=True) if d)
        assert len(reducer.cached_due_sets) <= PLAN_CACHE
    assert None in reducer.cached_due_sets
