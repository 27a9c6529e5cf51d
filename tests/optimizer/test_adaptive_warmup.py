"""AdaptiveWarmup (ds_spngd.schedules, AutoWU of Kim et al., arXiv:2107.05855) on synthetic loss curves, no DeepSpeed.

Curves: ``bowl`` is a function of the current LR with a known minimum, ``loss = (ln lr - ln lr*)^2 / 4 + noise``:
under exponential warmup the loss falls until the LR passes lr*, then rises, so warmup must end a little after that
step with a peak LR near lr*. ``falling`` decreases for the whole run: warmup must run to its cap.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from ds_spngd import SPNGDConfigError
from ds_spngd.schedules import AdaptiveWarmup, AdaptiveWarmupConfigError, past_minimum_test

TOTAL = 400  # cap = 200 steps; growth "auto" = 1e5 ** (1 / 200) per step from min_lr_ratio 1e-5
LR_STAR = 1e-2  # the bowl's minimum: the warmup LR passes it at step ln(1e3) / ln(growth) = 120
Curve = Callable[[int, float, float], float]  # (step, lr, noise draw) -> loss


def bowl(step: int, lr: float, noise: float) -> float:
    return (math.log(lr) - math.log(LR_STAR)) ** 2 / 4 + noise


def falling(step: int, lr: float, noise: float) -> float:
    return 2.0 * math.exp(-step / 150) + noise


def make(lrs: tuple[float, ...] = (1.0,), **params: object) -> AdaptiveWarmup:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return AdaptiveWarmup(torch.optim.SGD(groups, lr=1.0), **{"total_num_steps": TOTAL, **params})


def run(sched: AdaptiveWarmup, curve: Curve | None, noise: np.ndarray, start: int = 0,
        stop: int = TOTAL) -> list[list[float]]:
    """Steps ``start..stop-1``: observe the curve's loss at the LR in effect (unless ``curve`` is None), step.
    Returns every group's LR of every step."""
    seen = []
    for t in range(start, stop):
        lrs = [g["lr"] for g in sched.optimizer.param_groups]
        seen.append(lrs)
        sched.optimizer.step()
        if curve is not None:
            sched.observe(curve(t, lrs[0], float(noise[t])))
        sched.step()
    return seen


def noise(seed: int, scale: float = 0.1) -> np.ndarray:
    return scale * np.random.default_rng(seed).standard_normal(TOTAL)


def crossing_step(lrs: list[list[float]]) -> int:
    return next(t for t, lr in enumerate(lrs) if lr[0] >= LR_STAR)


@pytest.mark.parametrize(("seed", "scale"), [(0, 0.1), (1, 0.1), (2, 0.2), (3, 0.05)])
def test_warmup_stops_after_the_loss_minimum_with_the_peak_near_it(seed: int, scale: float) -> None:
    sched = make()
    lrs = run(sched, bowl, noise(seed, scale))
    cross = crossing_step(lrs)
    assert cross == 120
    found = sched.warmup_steps_found
    assert found is not None and cross < found <= cross + 50, (found, sched.last_test)
    assert sched.peak_lr is not None and abs(math.log(sched.peak_lr / LR_STAR)) < math.log(1.6), sched.peak_lr
    assert lrs[found][0] == pytest.approx(sched.peak_lr)  # the decay starts at the peak, the LR at the minimum


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_falling_loss_warms_up_to_the_cap(seed: int) -> None:
    sched = make()
    lrs = run(sched, falling, noise(seed), stop=TOTAL // 2 + 5)
    assert sched.warmup_steps_found == TOTAL // 2
    assert sched.peak_lr == pytest.approx(1.0)
    assert lrs[0][0] == pytest.approx(1e-5) and lrs[199][0] < 1.0 and lrs[200][0] == pytest.approx(1.0)
    assert all(b[0] > a[0] for a, b in zip(lrs[:199], lrs[1:200], strict=True))  # exponential growth


@pytest.mark.parametrize(("decay", "final"), [("cosine", 0.0), ("cosine", 0.1), ("linear", 0.0), ("linear", 0.25)])
def test_decay_reaches_final_ratio_of_peak_at_total_steps(decay: str, final: float) -> None:
    sched = make(decay=decay, final_lr_ratio=final, max_warmup_fraction=0.25)  # no losses: warmup runs to its cap
    lrs = [lr[0] for lr in run(sched, None, noise(0), stop=TOTAL)]
    start, peak = sched.warmup_steps_found, sched.peak_lr
    assert start == 100 and peak == pytest.approx(1.0)
    assert all(b <= a for a, b in zip(lrs[start:], lrs[start + 1:], strict=False))
    mid = 1.0 - (1.0 - final) * 0.5  # half way: (1 + cos(pi / 2)) / 2 = 1 / 2 of the way for both shapes
    assert lrs[start + (TOTAL - start) // 2] == pytest.approx(mid * peak)
    assert sched.get_last_lr()[0] == pytest.approx(final * peak)  # after the last step: the LR of step TOTAL
    run(sched, None, noise(0), start=TOTAL, stop=TOTAL + 3)
    assert sched.get_last_lr()[0] == pytest.approx(final * peak)  # held


def test_param_groups_keep_their_base_lr_ratios() -> None:
    sched = make(lrs=(1.0, 0.1, 3.0))
    lrs = run(sched, bowl, noise(0))
    assert sched.warmup_steps_found is not None and sched.warmup_steps_found < TOTAL // 2
    for step in lrs:
        assert step[1] == pytest.approx(0.1 * step[0], rel=1e-12) and step[2] == pytest.approx(3.0 * step[0])
    assert sched.peak_lrs == pytest.approx([sched.peak_lr, 0.1 * sched.peak_lr, 3.0 * sched.peak_lr])


@pytest.mark.parametrize("stop_at", [95, 150, 300])  # warmup before any test / between tests / in the decay
def test_state_dict_resumes_exactly(stop_at: int) -> None:
    draws = noise(4)
    reference = make(lrs=(1.0, 0.5))
    expected = run(reference, bowl, draws)
    first = make(lrs=(1.0, 0.5))
    seen = run(first, bowl, draws, stop=stop_at)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # plain Python: loads with weights_only
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = make(lrs=(1.0, 0.5), window=50)  # the checkpoint's config wins
    resumed.load_state_dict(copy.deepcopy(state))
    assert resumed.cfg == first.cfg and resumed.get_last_lr() == first.get_last_lr()
    seen += run(resumed, bowl, draws, start=stop_at)
    assert seen == expected
    assert (resumed.warmup_steps_found, resumed.peak_lr) == (reference.warmup_steps_found, reference.peak_lr)


def test_agree_hook_decides() -> None:
    calls: list[tuple[bool, float]] = []

    def first_rank_says_yes(passed: bool, ratio: float) -> tuple[bool, float]:
        calls.append((passed, ratio))
        return True, 0.5

    sched = make(agree=first_rank_says_yes, check_every=5, min_points=10, patience=2)
    run(sched, falling, noise(0), stop=30)
    assert len(calls) == 2 and sched.warmup_steps_found == 15 and sched.peak_lr == 0.5


def test_observe_rules() -> None:
    sched = make(min_points=3, check_every=1, patience=1)
    sched.optimizer.step()
    sched.observe(float("nan"))  # left out of the fit
    sched.step()
    sched.observe(5.0)
    sched.observe(1.0)  # replaces the first observation of this step
    sched.step()
    assert sched.steps == [1] and sched.losses == [1.0]
    with pytest.raises(ValueError, match="takes no epoch"):
        sched.step(3)


def test_auto_check_interval_gives_about_forty_tests_per_capped_warmup() -> None:
    assert make().check_every == 5  # cap 200
    assert make(total_num_steps=96).check_every == 1  # cap 48: every step
    assert make(total_num_steps=10_000).check_every == 125
    assert make(check_every=7).check_every == 7


def test_zero_cap_starts_in_the_decay() -> None:
    sched = make(max_warmup_fraction=0.0)
    assert sched.warmup_steps_found == 0 and sched.get_last_lr() == [1.0]


@pytest.mark.parametrize(("params", "named"), [
    ({"windw": 10}, "scheduler.params.windw: unknown key"),
    ({"growth": 0.9}, "scheduler.params.growth"),
    ({"growth": "fast"}, "scheduler.params.growth"),
    ({"total_num_steps": 0}, "scheduler.params.total_num_steps"),
    ({"total_num_steps": "auto"}, "scheduler.params.total_num_steps: 'auto' must be filled"),
    ({"min_lr_ratio": 0.0}, "scheduler.params.min_lr_ratio"),
    ({"max_warmup_fraction": 1.5}, "scheduler.params.max_warmup_fraction"),
    ({"check_every": True}, "scheduler.params.check_every"),
    ({"check_every": 0}, "scheduler.params.check_every"),
    ({"decay": "step"}, "scheduler.params.decay"),
    ({"final_lr_ratio": -0.1}, "scheduler.params.final_lr_ratio"),
    ({"confidence": 1.0}, "scheduler.params.confidence"),
    ({"min_points": 30, "window": 20}, "min_points (30) must be <= window (20)"),
])
def test_config_errors_name_the_key(params: dict[str, object], named: str) -> None:
    with pytest.raises(AdaptiveWarmupConfigError, match=named.replace("(", r"\(").replace(")", r"\)")) as err:
        make(**params)
    assert isinstance(err.value, SPNGDConfigError)


def test_load_state_dict_refuses_foreign_state() -> None:
    sched = make()
    with pytest.raises(ValueError, match="not an AdaptiveWarmup state_dict"):
        sched.load_state_dict({"last_epoch": 3})
    with pytest.raises(ValueError, match="param groups"):
        sched.load_state_dict(make(lrs=(1.0, 2.0)).state_dict())


def test_past_minimum_test_checks_inputs() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        past_minimum_test([0, 1], [1.0, 2.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        past_minimum_test([0, 2, 1], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="finite"):
        past_minimum_test([0, 1, 2], [1.0, math.inf, 3.0])
    flat = past_minimum_test(list(range(30)), [1.0] * 30)
    assert flat.probability < 0.95  # a constant loss never passed its minimum
