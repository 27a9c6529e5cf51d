"""SP-NGD's update rule on tiny models, without DeepSpeed and without torch.distributed.

References are independent: torch.optim.SGD for parameters without a Fisher block, hand-written momentum formulas,
and a kl_clip=None / lr=1 / momentum=0 run on a deep copy to read off the preconditioned direction ĝ.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ds_spngd import SPNGD

Batch = tuple[torch.Tensor, torch.Tensor]


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-5,
                  atol: float = 1e-7) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


def _fwd_bwd(model: nn.Module, batch: Batch, loss_fn: Callable[..., torch.Tensor] | None = None) -> None:
    x, y = batch
    out = model(x)
    loss = F.cross_entropy(out, y) if loss_fn is None else loss_fn(out, y)
    loss.backward()


# ---- models ------------------------------------------------------------------------------------------------------
class EmbNet(nn.Module):
    """Embedding + a Linear head (both skipped in the tests that need a block-free model)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(8, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(idx).flatten(1))


def _emb_batches(n: int, seed: int = 0) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 10, (6, 2), generator=gen), torch.randint(0, 3, (6,), generator=gen)) for _ in range(n)]


class MLP(nn.Module):
    def __init__(self, d_in: int = 5, hidden: int = 4, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _mlp_batches(n: int, d_in: int = 5, d_out: int = 3, seed: int = 0, size: int = 8) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, d_in, generator=gen), torch.randint(0, d_out, (size,), generator=gen))
            for _ in range(n)]


LRS = [0.1, 0.1, 0.05, 0.2, 0.2, 0.01, 0.3]


# ---- (a) parameters without a Fisher block follow torch.optim.SGD ------------------------------------------------
@pytest.mark.parametrize(("momentum", "wd"), [(0.9, 0.0), (0.9, 1e-2), (0.5, 5e-3), (0.0, 1e-2)])
def test_no_block_params_follow_torch_sgd_with_lr_changes(momentum: float, wd: float) -> None:
    torch.manual_seed(0)
    base = EmbNet()
    m_ngd, m_sgd = copy.deepcopy(base), copy.deepcopy(base)
    opt = SPNGD(m_ngd.parameters(), model=m_ngd, config={"lr": LRS[0], "momentum": momentum, "weight_decay": wd,
                                                          "skip_modules": ["head", "emb"]})
    assert opt.blocks == []
    sgd = torch.optim.SGD(m_sgd.parameters(), lr=LRS[0], momentum=momentum, weight_decay=wd, dampening=0.0,
                          nesterov=False)
    for lr, batch in zip(LRS, _emb_batches(len(LRS)), strict=True):
        for o in (opt, sgd):
            o.param_groups[0]["lr"] = lr
            o.zero_grad()
        _fwd_bwd(m_ngd, batch)
        _fwd_bwd(m_sgd, batch)
        opt.step()
        sgd.step()
        _assert_close(_params(m_ngd), _params(m_sgd))
    assert _params(m_ngd)["emb.weight"].ne(_params(base)["emb.weight"]).any()


def test_all_modules_skipped_follow_torch_sgd_with_param_groups() -> None:
    """Every module of an MLP listed in skip_modules, two param groups with their own lr/momentum/weight_decay."""
    torch.manual_seed(1)
    base = MLP()
    m_ngd, m_sgd = copy.deepcopy(base), copy.deepcopy(base)

    def groups(m: MLP) -> list[dict[str, object]]:
        return [{"params": list(m.fc1.parameters())},
                {"params": list(m.fc2.parameters()), "lr": 0.05, "momentum": 0.5, "weight_decay": 1e-2}]

    opt = SPNGD(groups(m_ngd), model=m_ngd, config={"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3,
                                                     "skip_modules": ["fc1", "fc2"]})
    assert opt.blocks == [] and {n for n, _ in opt.fallback} == {"fc1", "fc2"}
    sgd = torch.optim.SGD(groups(m_sgd), lr=0.1, momentum=0.9, weight_decay=1e-3)
    scales = [1.0, 1.0, 0.5, 2.0, 0.1, 1.0]
    for s, batch in zip(scales, _mlp_batches(len(scales)), strict=True):
        for o in (opt, sgd):
            o.param_groups[0]["lr"] = 0.1 * s
            o.param_groups[1]["lr"] = 0.05 / s
            o.zero_grad()
        _fwd_bwd(m_ngd, batch)
        _fwd_bwd(m_sgd, batch)
        opt.step()
        sgd.step()
        _assert_close(_params(m_ngd), _params(m_sgd))


def test_momentum_correction_matches_sgd_when_lr_starts_at_zero() -> None:
    """DeepSpeed's WarmupLR starts at warmup_min_lr = 0 by default: the first step runs with lr 0. torch SGD still
    puts the first gradient into its buffer; the corrected velocity must too."""
    torch.manual_seed(2)
    base = EmbNet()
    m_ngd, m_sgd = copy.deepcopy(base), copy.deepcopy(base)
    opt = SPNGD(m_ngd.parameters(), model=m_ngd, config={"lr": 0.1, "momentum": 0.9, "skip_modules": ["head", "emb"]})
    sgd = torch.optim.SGD(m_sgd.parameters(), lr=0.1, momentum=0.9)
    lrs = [0.0, 0.05, 0.1, 0.1]
    for lr, batch in zip(lrs, _emb_batches(len(lrs), seed=3), strict=True):
        for o in (opt, sgd):
            o.param_groups[0]["lr"] = lr
            o.zero_grad()
        _fwd_bwd(m_ngd, batch)
        _fwd_bwd(m_sgd, batch)
        opt.step()
        sgd.step()
        _assert_close(_params(m_ngd), _params(m_sgd))


@pytest.mark.parametrize("correction", [True, False])
def test_hand_formula_velocity(correction: bool) -> None:
    """v ← m·c·v + η·d, w ← w − v with c = η_t/η_{t−1} (correction) or 1; d = g + wd·w."""
    torch.manual_seed(3)
    base = EmbNet()
    m_ngd, m_sgd = copy.deepcopy(base), copy.deepcopy(base)
    mom, wd = 0.9, 1e-2
    opt = SPNGD(m_ngd.parameters(), model=m_ngd, config={"lr": LRS[0], "momentum": mom, "weight_decay": wd,
                                                          "momentum_correction": correction,
                                                          "skip_modules": ["head", "emb"]})
    sgd = torch.optim.SGD(m_sgd.parameters(), lr=LRS[0], momentum=mom, weight_decay=wd)
    ref = {n: p.detach().double().clone() for n, p in base.named_parameters()}
    vel: dict[str, torch.Tensor] = {}
    prev_lr = LRS[0]
    max_gap = 0.0
    for lr, batch in zip(LRS, _emb_batches(len(LRS), seed=4), strict=True):
        for o in (opt, sgd):
            o.param_groups[0]["lr"] = lr
            o.zero_grad()
        _fwd_bwd(m_ngd, batch)
        _fwd_bwd(m_sgd, batch)
        grads = {n: p.grad.double() for n, p in m_ngd.named_parameters()}
        opt.step()
        sgd.step()
        c = lr / prev_lr if correction else 1.0
        prev_lr = lr
        for n, g in grads.items():
            d = g + wd * ref[n]
            vel[n] = lr * d if n not in vel else mom * c * vel[n] + lr * d
            ref[n] = ref[n] - vel[n]
        got = _params(m_ngd)
        for n in ref:
            torch.testing.assert_close(got[n].double(), ref[n], rtol=1e-5, atol=1e-7)
        sgd_p = _params(m_sgd)
        max_gap = max(max_gap, max(float((got[n] - sgd_p[n]).abs().max()) for n in got))
    if correction:
        assert max_gap < 1e-5
    else:  # the LR changes make the uncorrected velocity differ from torch SGD
        assert max_gap > 1e-3


@pytest.mark.parametrize("correction", [True, False])
def test_momentum_buffer_layout(correction: bool) -> None:
    """With momentum_correction the buffer is torch SGD's u (= d after one step); without it, v = η·d."""
    torch.manual_seed(4)
    m = EmbNet()
    opt = SPNGD(m.parameters(), model=m, config={"lr": 0.2, "momentum": 0.9, "skip_modules": ["head", "emb"],
                                                 "momentum_correction": correction})
    _fwd_bwd(m, _emb_batches(1)[0])
    grad = m.emb.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(opt.state[m.emb.weight]["momentum_buffer"], grad if correction else 0.2 * grad)


# ---- (b) the report --------------------------------------------------------------------------------------------
class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gconv = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.skipme = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx).permute(0, 3, 1, 2)  # N × 3 × H × W
        x = self.bn(self.gconv(torch.relu(self.conv(x))))
        x = x.mean(dim=(2, 3))
        return self.fc(torch.relu(self.skipme(x)))


def test_report_names_blocks_and_fallbacks() -> None:
    torch.manual_seed(5)
    m = Mixed()
    opt = SPNGD(m.parameters(), model=m, config={"skip_modules": ["skipme"]})
    report = opt.report()
    assert {b.name for b in opt.blocks} == {"emb", "conv", "bn", "fc"}
    assert {b.name: b.kind for b in opt.blocks} == {"emb": "kronecker", "conv": "kronecker", "bn": "unit_wise",
                                                    "fc": "kronecker"}
    fallback = dict(opt.fallback)
    assert set(fallback) == {"gconv", "skipme"}
    assert "groups=2" in fallback["gconv"]
    assert "skip_modules" in fallback["skipme"]
    head, _, tail = report.partition("plain momentum-SGD update")
    assert "4 module(s)" in head and "Embedding K-FAC, A diagonal 10" in head
    for name in ("emb", "conv", "bn", "fc"):
        assert f"  {name}: " in head
    for name, reason in fallback.items():
        assert f"  {name}: {reason}" in tail
    assert "A 28x28, G 4x4" in head  # conv: 3·3·3 + bias


def test_step_runs_on_mixed_model() -> None:
    torch.manual_seed(6)
    m = Mixed()
    opt = SPNGD(m.parameters(), model=m, config={"skip_modules": ["skipme"], "lr": 0.05})
    gen = torch.Generator().manual_seed(0)
    before = _params(m)
    for _ in range(3):
        opt.zero_grad()
        idx = torch.randint(0, 10, (4, 5, 5), generator=gen)
        _fwd_bwd(m, (idx, torch.randint(0, 2, (4,), generator=gen)))
        opt.step()
    after = _params(m)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert all(b.has_preconditioner for b in opt.blocks)


# ---- (c) weight rescaling --------------------------------------------------------------------------------------
class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(4, 3)
        self.small = nn.Linear(4, 5)
        self.big_skipped = nn.Linear(4, 2)
        with torch.no_grad():
            self.big.weight.fill_(2.0)  # ‖W‖ = 2·√12 ≈ 6.9 > √6
            self.small.weight.mul_(0.1)  # ‖W‖ < √10
            self.big_skipped.weight.fill_(3.0)  # > √4, but no Fisher block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.big(x), self.small(x), self.big_skipped(x)], dim=1)


def test_weight_rescale() -> None:
    torch.manual_seed(7)
    base = TwoHeads()
    assert float(base.small.weight.detach().norm()) < math.sqrt(10)
    m_on, m_off = copy.deepcopy(base), copy.deepcopy(base)
    cfg = {"lr": 0.01, "momentum": 0.9, "skip_modules": ["big_skipped"]}
    opt_on = SPNGD(m_on.parameters(), model=m_on, config={**cfg, "weight_rescale": True})
    opt_off = SPNGD(m_off.parameters(), model=m_off, config={**cfg, "weight_rescale": False})
    for batch in _mlp_batches(3, d_in=4, d_out=10, seed=8):
        for m, o in ((m_on, opt_on), (m_off, opt_off)):
            o.zero_grad()
            _fwd_bwd(m, batch)
        opt_off.step()
        opt_on.step()
        # the first step lands exactly on the bound; later updates may pull the norm below it, never above
        assert float(m_on.big.weight.detach().norm()) <= math.sqrt(2 * 3) * (1 + 1e-6)
        assert float(m_on.small.weight.detach().norm()) < math.sqrt(2 * 5)
    assert float(m_off.big.weight.detach().norm()) > math.sqrt(6)  # without rescaling the norm stays above the bound
    assert float(m_off.big_skipped.weight.detach().norm()) > 2.0
    assert float(m_on.big_skipped.weight.detach().norm()) > 2.0  # no Fisher block: never rescaled


def test_weight_rescale_first_step_direction() -> None:
    torch.manual_seed(8)
    base = TwoHeads()
    m_on, m_off = copy.deepcopy(base), copy.deepcopy(base)
    cfg = {"lr": 0.01, "momentum": 0.9, "skip_modules": ["big_skipped"]}
    opt_on = SPNGD(m_on.parameters(), model=m_on, config={**cfg, "weight_rescale": True})
    opt_off = SPNGD(m_off.parameters(), model=m_off, config={**cfg, "weight_rescale": False})
    batch = _mlp_batches(1, d_in=4, d_out=10, seed=9)[0]
    for m, o in ((m_on, opt_on), (m_off, opt_off)):
        _fwd_bwd(m, batch)
        o.step()
    w_off = m_off.big.weight.detach()
    bound = math.sqrt(6)
    assert float(w_off.norm()) > bound
    torch.testing.assert_close(m_on.big.weight.detach(), w_off * (bound / w_off.norm()), rtol=1e-6, atol=1e-7)
    # below the bound, biases, and modules without a Fisher block: untouched
    on, off = _params(m_on), _params(m_off)
    for n in ("small.weight", "small.bias", "big.bias", "big_skipped.weight", "big_skipped.bias"):
        assert torch.equal(on[n], off[n]), n
    assert float(on["big_skipped.weight"].norm()) > 2.0


# ---- (d) KL-clipping -------------------------------------------------------------------------------------------
class ClipNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 4)
        self.fc2 = nn.Linear(4, 3)
        self.side = nn.Linear(5, 3)  # skipped: plain SGD, not clipped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x))) + self.side(x)


def _natural_direction(base: nn.Module, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(ĝ, g) per parameter: one kl_clip=None, lr=1, momentum=0 step on a deep copy gives Δw = −ĝ."""
    m = copy.deepcopy(base)
    opt = SPNGD(m.parameters(), model=m, config={"lr": 1.0, "momentum": 0.0, "skip_modules": ["side"]})
    _fwd_bwd(m, batch)
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters()}
    before = _params(m)
    opt.step()
    after = _params(m)
    assert "kl_clip_nu" not in opt.last_stats
    return {n: before[n] - after[n] for n in before}, grads


@pytest.mark.parametrize("target_nu", [0.3, 0.05, None])
def test_kl_clip(target_nu: float | None) -> None:
    torch.manual_seed(9)
    base = ClipNet()
    batch = _mlp_batches(1, seed=10)[0]
    nat, grads = _natural_direction(base, batch)
    blocks = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    vg = sum(float((nat[n].double() * grads[n].double()).sum()) for n in blocks)
    assert vg > 0
    lr = 0.5
    kappa = 1e3 if target_nu is None else target_nu**2 * lr**2 * vg
    nu = min(1.0, math.sqrt(kappa / (lr * lr * vg)))
    if target_nu is not None:
        assert nu == pytest.approx(target_nu)
    m = copy.deepcopy(base)
    opt = SPNGD(m.parameters(), model=m, config={"lr": lr, "momentum": 0.0, "kl_clip": kappa,
                                                 "skip_modules": ["side"]})
    _fwd_bwd(m, batch)
    before = _params(m)
    opt.step()
    after = _params(m)
    assert opt.last_stats["kl_clip_nu"] == pytest.approx(nu, rel=1e-5)
    for n in blocks:
        torch.testing.assert_close(before[n] - after[n], nu * lr * nat[n], rtol=1e-4, atol=1e-7)
    for n in ("side.weight", "side.bias"):  # no Fisher block: plain −η·g, never clipped
        torch.testing.assert_close(before[n] - after[n], lr * grads[n], rtol=1e-5, atol=1e-8)


# ---- (e) NaN / Inf gradients -------------------------------------------------------------------------------------
def _state_snapshot(opt: SPNGD) -> dict[int, torch.Tensor]:
    return {id(p): s["momentum_buffer"].clone() for p, s in opt.state.items() if "momentum_buffer" in s}


@pytest.mark.parametrize(("param", "bad", "names"), [("fc1.weight", float("nan"), "fc1"),
                                                      ("fc2.bias", float("inf"), "fc2"),
                                                      ("side.weight", -float("inf"), "side.weight")])
def test_non_finite_gradient_raises_and_changes_nothing(param: str, bad: float, names: str) -> None:
    torch.manual_seed(10)
    m = ClipNet()
    opt = SPNGD(m.parameters(), model=m, config={"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3,
                                                 "skip_modules": ["side"]})
    batches = _mlp_batches(2, seed=11)
    _fwd_bwd(m, batches[0])
    opt.step()  # momentum buffers and preconditioners exist now
    opt.zero_grad()
    _fwd_bwd(m, batches[1])
    with torch.no_grad():
        dict(m.named_parameters())[param].grad.view(-1)[1] = bad
    before, state_before, steps = _params(m), _state_snapshot(opt), opt.steps
    with pytest.raises(FloatingPointError) as err:
        opt.step()
    assert names in str(err.value)
    after = _params(m)
    for n in before:
        assert torch.equal(before[n], after[n]), n
    state_after = _state_snapshot(opt)
    assert state_before.keys() == state_after.keys()
    assert all(torch.equal(state_before[k], state_after[k]) for k in state_before)
    assert opt.steps == steps


def test_step_after_a_skipped_non_finite_batch_is_clean() -> None:
    """A NaN loss (as under an fp overflow) makes step() raise; the caller skips that batch. The next clean batch must
    give exactly the update a fresh optimizer gives on it: nothing of the skipped batch (not its factor statistics)
    may leak into it."""
    torch.manual_seed(11)
    base = ClipNet()
    cfg = {"lr": 0.1, "momentum": 0.9, "skip_modules": ["side"], "factor_decay": 0.0}
    m, m_ref = copy.deepcopy(base), copy.deepcopy(base)
    opt = SPNGD(m.parameters(), model=m, config=cfg)
    opt_ref = SPNGD(m_ref.parameters(), model=m_ref, config=cfg)
    bad, good = _mlp_batches(2, seed=12)
    _fwd_bwd(m, bad, loss_fn=lambda out, y: F.cross_entropy(out, y) * float("nan"))
    with pytest.raises(FloatingPointError):
        opt.step()
    opt.zero_grad()
    _fwd_bwd(m, good)
    opt.step()
    _fwd_bwd(m_ref, good)
    opt_ref.step()
    _assert_close(_params(m), _params(m_ref), rtol=1e-6, atol=1e-8)


# ---- (f) no step while an engine is built (the DeepSpeed glue's gate; it imports no DeepSpeed) ------------------
def test_step_disabled_while_built_is_a_no_op() -> None:
    from ds_spngd.integrations.deepspeed.construction import step_disabled

    torch.manual_seed(12)
    m = ClipNet()
    opt = SPNGD(m.parameters(), model=m, config={"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1,
                                                 "weight_rescale": True, "kl_clip": 1e-6})
    _fwd_bwd(m, _mlp_batches(1, seed=13)[0])
    before = _params(m)
    with step_disabled(opt):
        assert opt.step() is None
    assert opt.steps == 0 and len(opt.state) == 0 and opt.last_stats == {}
    assert all(torch.equal(before[n], p) for n, p in _params(m).items())
    assert all(not b.has_preconditioner for b in opt.blocks)
    assert "step" not in vars(opt)  # the class's step again
    opt.step()
    assert opt.steps == 1 and any(not torch.equal(before[n], p) for n, p in _params(m).items())


def test_step_disabled_ignores_zero_gradients_and_closure() -> None:
    from ds_spngd.integrations.deepspeed.construction import step_disabled

    m = MLP()
    opt = SPNGD(m.parameters(), model=m)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    calls = []
    with step_disabled(opt):
        opt.step(closure=lambda: calls.append(1) or 0.0)
    assert calls == [] and opt.steps == 0


# ---- (g) a module whose hooks never fire ------------------------------------------------------------------------
class Unfired(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.unused = nn.Linear(5, 3)  # registered, never called
        self.functional = nn.Linear(5, 2)  # its parameters are used, its forward (and hooks) never run

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x), F.linear(x, self.functional.weight, self.functional.bias)


def _unfired_loss(out: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    logits, side = out
    return F.cross_entropy(logits, y) + side.square().mean()  # the side loss depends on `functional` only


def test_never_fired_module_gets_sgd_update(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(13)
    base = Unfired()
    m, m_sgd = copy.deepcopy(base), copy.deepcopy(base)
    opt = SPNGD(m.parameters(), model=m, config={"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3})
    assert {b.name for b in opt.blocks} == {"fc", "unused", "functional"}
    sgd = torch.optim.SGD(m_sgd.functional.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    lrs = [0.1, 0.1, 0.05, 0.2]
    with caplog.at_level(logging.WARNING, logger="ds_spngd"):
        for lr, batch in zip(lrs, _mlp_batches(len(lrs), seed=14), strict=True):
            for o in (opt, sgd):
                o.param_groups[0]["lr"] = lr
                o.zero_grad()
            _fwd_bwd(m, batch, loss_fn=_unfired_loss)
            _fwd_bwd(m_sgd, batch, loss_fn=_unfired_loss)
            opt.step()
            sgd.step()
            got, want = _params(m), _params(m_sgd)
            for n in ("functional.weight", "functional.bias"):
                torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)
            for n in ("unused.weight", "unused.bias"):  # no gradient: untouched, as torch SGD leaves it
                assert torch.equal(got[n], _params(base)[n])
    blocks = {b.name: b for b in opt.blocks}
    assert blocks["fc"].has_preconditioner
    assert not blocks["unused"].has_preconditioner and not blocks["functional"].has_preconditioner
    warnings = [r.getMessage() for r in caplog.records if "never fired" in r.getMessage()]
    assert len(warnings) == 1 and "unused" in warnings[0] and "functional" in warnings[0]


def test_kl_clip_with_zero_learning_rate() -> None:
    """WarmupLR/WarmupDecayLR start at lr 0: KL-clipping must not divide by η² = 0 (it crashed the main job)."""
    torch.manual_seed(21)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    before = [p.detach().clone() for p in model.parameters()]
    opt = SPNGD(model.parameters(), model=model, config={"lr": 0.1, "kl_clip": 1e-2})
    opt.param_groups[0]["lr"] = 0.0
    nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,))).backward()
    opt.step()
    assert opt.last_stats["kl_clip_nu"] == 1.0
    for p, q in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), q)
