"""Asynchronous inverses (``async_inverse``; Ba, Grosse & Martens, ICLR 2017, §3–4;
ds_spngd/comm/async_inversion.py) against an independent reference: a dense K-FAC on one Linear layer written out
here (factors as running averages of per-example statistics, the damped G ⊗ A built with ``torch.kron`` and solved in
fp64, tests/optimizer/test_curvature.py), whose preconditioner is the factors of the last inversion step *installed
``delay`` steps later* (the first inversion synchronous). The synchronous optimizer must match the same reference
with no delay, which guards the reference itself; a checkpoint taken while an inversion is in flight resumes the
same trajectory; config errors are named.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ds_spngd import SPNGD, SPNGDConfigError
from tests.optimizer.test_curvature import DAMPING, kron_solve, per_example_grads, per_example_output_grads, with_ones

LR, DECAY, EVERY, STEPS = 0.2, 0.5, 3, 10


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 3))


def _batches(n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(n)]


def _spngd(model: nn.Module, asynchronous: bool, delay: int | None = None) -> SPNGD:
    return SPNGD(model.parameters(), model=model, config={
        "lr": LR, "momentum": 0.0, "damping": DAMPING, "factor_decay": DECAY, "inv_update_steps": EVERY,
        "async_inverse": asynchronous, "async_inverse_delay": delay})


def _wb(model: nn.Sequential) -> torch.Tensor:
    return torch.cat([model[0].weight, model[0].bias.unsqueeze(-1)], dim=1).detach().double()


def _train(model: nn.Sequential, opt: SPNGD, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    out = []
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        out.append(_wb(model))
    return out


def _reference(delay: int, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """[W | b] after each step of dense K-FAC whose inversion of step t (t % EVERY == 0) is used from step t + delay
    on (step 0's at once: there is no older one)."""
    model = _model()
    a_fac = g_fac = None
    used: tuple[torch.Tensor, torch.Tensor] | None = None
    launched: list[tuple[int, tuple[torch.Tensor, torch.Tensor]]] = []
    out = []
    for t, (x, y) in enumerate(batches):
        a = with_ones(x.double())
        g = per_example_output_grads(model, 0, x, y)
        a_hat, g_hat = a.T @ a / x.shape[0], g.T @ g / x.shape[0]
        a_fac = a_hat if a_fac is None else DECAY * a_fac + (1 - DECAY) * a_hat
        g_fac = g_hat if g_fac is None else DECAY * g_fac + (1 - DECAY) * g_hat
        ready = [f for at, f in launched if at <= t]  # installed before this step's inversion, as in SP-NGD
        if ready:
            used = ready[-1]
        launched = [(at, f) for at, f in launched if at > t]
        if t % EVERY == 0:
            if used is None or delay == 0:
                used = (g_fac.clone(), a_fac.clone())
            else:
                launched.append((t + delay, (g_fac.clone(), a_fac.clone())))
        assert used is not None
        grad = per_example_grads(model, "0", x, y).mean(0)
        step = kron_solve(used[0], used[1], grad, "inverse").reshape(3, 6)
        with torch.no_grad():
            model[0].weight -= LR * step[:, :5].float()
            model[0].bias -= LR * step[:, 5].float()
        out.append(_wb(model))
    return out


def _close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for t, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m, t=t: f"step {t}: {m}")


def test_synchronous_matches_the_reference_without_delay() -> None:
    batches = _batches()
    model = _model()
    _close(_train(model, _spngd(model, False), batches), _reference(0, batches))


@pytest.mark.parametrize("delay", [1, 2, 3])
def test_async_installs_the_launch_steps_inverse_delay_steps_later(delay: int) -> None:
    batches = _batches()
    model = _model()
    got = _train(model, _spngd(model, True, delay), batches)
    _close(got, _reference(delay, batches))
    sync_model = _model()
    sync = _train(sync_model, _spngd(sync_model, False), batches)
    assert float((got[-1] - sync[-1]).abs().max()) > 1e-4, "the delay had no effect"


def test_default_delay_is_inv_update_steps() -> None:
    batches = _batches()
    model = _model()
    _close(_train(model, _spngd(model, True), batches), _reference(EVERY, batches))


def test_checkpoint_with_an_inversion_in_flight_resumes_the_same_trajectory() -> None:
    """Saved after step 4 (the inversion launched at step 3 installs at step 6): a fresh optimizer loaded from the
    state dict installs the same preconditioner at the same step."""
    batches = _batches()
    model = _model()
    opt = _spngd(model, True)
    full = _train(model, opt, batches)
    model2 = _model()
    opt2 = _spngd(model2, True)
    _train(model2, opt2, batches[:5])
    assert opt2.inverter is not None and opt2.inverter.pending is not None
    assert opt2.inverter.pending.install_step == 6
    state = copy.deepcopy(opt2.state_dict())
    weights = copy.deepcopy(model2.state_dict())
    model3 = _model()
    model3.load_state_dict(weights)
    opt3 = _spngd(model3, True)
    opt3.load_state_dict(state)
    assert opt3.inverter is not None and opt3.inverter.pending is not None
    _close(_train(model3, opt3, batches[5:]), full[5:])
    opt.remove_hooks()
    opt3.remove_hooks()


@pytest.mark.parametrize(("params", "words"), [
    ({"async_inverse_delay": 4, "inv_update_steps": 3}, "async_inverse_delay (4) must be at most inv_update_steps"),
    ({"async_inverse_delay": 0}, "optimizer.params.async_inverse_delay"),
    ({"async_inverse_delay": True}, "optimizer.params.async_inverse_delay"),
    ({"async_inverse": "yes please"}, "optimizer.params.async_inverse"),
])
def test_config_errors_are_named(params: dict, words: str) -> None:
    model = _model()
    with pytest.raises(SPNGDConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        SPNGD(model.parameters(), model=model, config=params)
