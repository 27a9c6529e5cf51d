"""ds_spngd_lab.export.quantized_bn: BN folding, fixed-point BN with a shared power-of-two scale, its error bound.

References are independent of the code under test: the unfolded eval-mode model for folding, ``F.batch_norm`` in
float64 (or ``γ (x − μ) / sqrt(σ² + ε) + β`` written out) for the BN map, and a SmallCNN trained here for 100 Adam
steps on real MNIST (about 88% test accuracy) for the end-to-end checks.
"""

from __future__ import annotations

import math
from typing import TypeVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ds_spngd_lab.data.mnist import MnistSplits, load_mnist
from ds_spngd_lab.evaluation import recalibrate_bn
from ds_spngd_lab.export import (
    QuantizedBatchNorm,
    bn_error_bound,
    bn_input_absmax,
    fold_bn_into_conv,
    measure_bn_errors,
    quantize_bn,
    quantized_layers,
)
from ds_spngd_lab.models import build_model
from ds_spngd_lab.models.cnn import SmallCNN

BITS = (8, 12, 16)
M = TypeVar("M", bound=nn.Module)


def _randomize_bns(model: M, seed: int = 0, spread: float = 1.0) -> M:
    """Random running statistics and affine parameters (``spread``: log-range of the per-channel scales); eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(torch.randn(c, generator=g))
            m.running_var.copy_(torch.exp(spread * torch.randn(c, generator=g)))
            if m.affine:
                m.weight.data.copy_(torch.randn(c, generator=g))
                m.bias.data.copy_(torch.randn(c, generator=g))
    return model.eval()


@torch.no_grad()
def _reference_bn(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The eval-mode BN map in float64 through ``F.batch_norm`` (not the code under test)."""
    d = torch.float64
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    assert bn.running_mean is not None and bn.running_var is not None
    return F.batch_norm(x.to(d), bn.running_mean.to(d), bn.running_var.to(d), bn.weight.to(d), bn.bias.to(d),
                        training=False, eps=bn.eps)  # fmt: skip


@torch.no_grad()
def _exact_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = γ / sqrt(σ² + ε)``, ``t = β − μ s`` in float64, written out."""
    assert bn.running_mean is not None and bn.running_var is not None
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return s, bn.bias.double() - bn.running_mean.double() * s


def _channel_max(v: torch.Tensor) -> torch.Tensor:
    return v.abs().transpose(0, 1).reshape(v.shape[1], -1).amax(dim=1).double()


# ---------------------------------------------------------------- (a) folding


class _Untraceable(nn.Module):
    """Data-dependent control flow (``torch.fx`` cannot trace it): folding falls back to nn.Sequential order."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return self.bn(y) if bool(y.sum() > 0) else -self.bn(y)


def _mixed_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, bias=True), nn.BatchNorm2d(16), nn.ReLU(),
        nn.BatchNorm2d(16),  # follows a ReLU: must stay
        nn.Flatten(), nn.Linear(16 * 3 * 3, 12), nn.BatchNorm1d(12),
    )  # fmt: skip


@pytest.mark.parametrize("spread", [0.5, 3.0])
def test_fold_matches_unfolded_model(spread: float) -> None:
    torch.manual_seed(0)
    net = _randomize_bns(_mixed_net(), spread=spread)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_bn_into_conv(net)
    kinds = [type(m) for m in folded]
    assert kinds.count(nn.Identity) == 3 and kinds.count(nn.BatchNorm2d) == 1 and nn.BatchNorm1d not in kinds
    assert folded[0].bias is not None  # a bias was added to the bias-free conv
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        ref, out = net(x), folded(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # the input model is untouched


def test_fold_resnet_through_fx_trace() -> None:
    torch.manual_seed(0)
    net = _randomize_bns(build_model("resnet18", num_classes=10, in_channels=1), seed=1)
    folded = fold_bn_into_conv(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())  # all 20, incl. downsample paths
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref, out = net(x), folded(x)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_fold_falls_back_to_sequential_order() -> None:
    torch.manual_seed(0)
    net = _randomize_bns(_Untraceable())
    folded = fold_bn_into_conv(net)
    assert isinstance(folded.body[1], nn.Identity) and isinstance(folded.bn, nn.BatchNorm2d)
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        ref, out = net(x), folded(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


# ---------------------------------------------------------------- (b) error bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bits", BITS)
def test_error_never_exceeds_bound_on_random_inputs(bits: int, dtype: torch.dtype) -> None:
    torch.manual_seed(bits)
    bn = _randomize_bns(nn.BatchNorm2d(64), seed=bits, spread=2.0)
    q = QuantizedBatchNorm.from_batchnorm(bn, bits)
    for scale in (0.1, 1.0, 30.0):
        x = (scale * torch.randn(32, 64, 5, 5)).to(dtype)
        err = _channel_max(q(x).double() - _reference_bn(bn, x))
        bound = bn_error_bound(q, _channel_max(x), dtype=dtype)
        assert q(x).dtype == dtype
        assert bool((err <= bound).all()), float((err - bound).max())
        assert bool((bound <= bn_error_bound(q, _channel_max(x), dtype=dtype, worst_case=True)).all())
    # the bound is attained within a factor ~2 somewhere (it is not vacuous)
    assert float((err / bound).max()) > 0.3


def test_error_bound_for_batchnorm1d_and_2d_input() -> None:
    bn = _randomize_bns(nn.BatchNorm1d(10), seed=3)
    q = QuantizedBatchNorm.from_batchnorm(bn, 8)
    x = torch.randn(100, 10) * 4
    err = (q(x).double() - _reference_bn(bn, x)).abs().amax(dim=0)
    assert bool((err <= bn_error_bound(q, x.abs().amax(dim=0))).all())
    assert bool((err <= bn_error_bound(q, float(x.abs().max()))).all())  # scalar X


def test_bound_halves_per_extra_bit() -> None:
    bn = _randomize_bns(nn.BatchNorm2d(256), seed=5, spread=1.0)
    layers = {b: QuantizedBatchNorm.from_batchnorm(bn, b) for b in BITS}
    x_max = torch.full((256,), 3.0)
    worst = {b: float(bn_error_bound(q, x_max, dtype=torch.float64, worst_case=True).max()) for b, q in layers.items()}
    actual = {b: float(bn_error_bound(q, x_max, dtype=torch.float64).max()) for b, q in layers.items()}
    for lo, hi in zip(BITS, BITS[1:], strict=False):
        dk = int(layers[hi].frac_bits) - int(layers[lo].frac_bits)
        assert dk in (hi - lo, hi - lo + 1)  # k is the largest exponent that fits: +1 per bit (rarely +1 more)
        assert worst[lo] / worst[hi] == pytest.approx(2.0**dk, rel=1e-6)
        per_bit = (actual[lo] / actual[hi]) ** (1 / (hi - lo))
        assert 1.6 < per_bit < 2.5, per_bit


# ---------------------------------------------------------------- (c) integer parameters, shared scale


@pytest.mark.parametrize("bits", [2, 4, 8, 12, 16, 24, 32])
def test_parameters_are_integers_in_range_with_one_exponent(bits: int) -> None:
    bn = _randomize_bns(nn.BatchNorm2d(48), seed=bits, spread=2.0)
    q = QuantizedBatchNorm.from_batchnorm(bn, bits)
    bias_bits = 32 if bits <= 16 else 64
    assert (q.bits, q.bias_bits) == (bits, bias_bits)
    assert q.multiplier.dtype == torch.int64 and q.offset.dtype == torch.int64
    assert q.frac_bits.dtype == torch.int64 and q.frac_bits.dim() == 0  # ONE exponent for the layer
    assert sorted(q.state_dict()) == ["frac_bits", "multiplier", "offset", "ref_scale", "ref_shift"]
    qmax = 2 ** (bits - 1) - 1
    assert int(q.multiplier.abs().max()) <= qmax and int(q.offset.abs().max()) <= 2 ** (bias_bits - 1) - 1
    assert int(q.multiplier.abs().max()) >= 2 ** (bits - 2)  # the shared scale uses the full range
    k = int(q.frac_bits)
    s, t = _exact_scale_shift(bn)
    assert float(s.abs().max()) * 2.0**k <= qmax < float(s.abs().max()) * 2.0 ** (k + 1)
    step = 2.0**-k
    # independent dequantisation: python ints times the power of two
    s_q = torch.tensor([m * step for m in q.multiplier.tolist()], dtype=torch.float64)
    t_q = torch.tensor([b * step for b in q.offset.tolist()], dtype=torch.float64)
    assert bool(((s_q - s).abs() <= step / 2).all()) and bool(((t_q - t).abs() <= step / 2).all())


def test_quantize_bn_replaces_every_bn_and_exports_through_state_dict() -> None:
    net = _randomize_bns(_mixed_net())
    q = quantize_bn(net, bits=8)
    layers = quantized_layers(q)
    assert list(layers) == ["1", "4", "6", "9"] and not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    assert isinstance(net[1], nn.BatchNorm2d)  # the input model is untouched
    state = q.state_dict()
    for name, layer in layers.items():
        assert torch.equal(state[f"{name}.multiplier"], layer.multiplier)
        assert state[f"{name}.frac_bits"].numel() == 1
    only = quantize_bn(net, bits=8, layers=["4"])
    assert list(quantized_layers(only)) == ["4"] and isinstance(only[1], nn.BatchNorm2d)


def test_zero_gamma_layer_uses_shift_for_the_scale() -> None:
    bn = _randomize_bns(nn.BatchNorm2d(4), seed=2)
    bn.weight.data.zero_()
    q = QuantizedBatchNorm.from_batchnorm(bn, 8)
    assert int(q.multiplier.abs().max()) == 0
    x = torch.randn(3, 4, 2, 2)
    assert bool((_channel_max(q(x).double() - _reference_bn(bn, x)) <= bn_error_bound(q, _channel_max(x))).all())


def test_errors() -> None:
    bn = _randomize_bns(nn.BatchNorm2d(4))
    for bad in (1, 33, 8.0, True):
        with pytest.raises(ValueError, match="bits"):
            QuantizedBatchNorm.from_batchnorm(bn, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bias_bits"):
        QuantizedBatchNorm.from_batchnorm(bn, 16, bias_bits=8)
    big = _randomize_bns(nn.BatchNorm2d(4))
    big.bias.data.fill_(1e6)
    with pytest.raises(ValueError, match="offset"):
        QuantizedBatchNorm.from_batchnorm(big, 16, bias_bits=16)
    net = _mixed_net().train()
    with pytest.raises(ValueError, match="training mode"):
        fold_bn_into_conv(net)
    with pytest.raises(ValueError, match="training mode"):
        quantize_bn(net)
    with pytest.raises(ValueError, match="running statistics"):
        quantize_bn(nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False)).eval())
    nan = _randomize_bns(nn.BatchNorm2d(4))
    assert nan.running_var is not None
    nan.running_var[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        QuantizedBatchNorm.from_batchnorm(nan, 8)
    with pytest.raises(ValueError, match="not BatchNorm"):
        quantize_bn(_randomize_bns(_mixed_net()), layers=["0"])
    q = QuantizedBatchNorm.from_batchnorm(bn, 8)
    with pytest.raises(ValueError, match="expected input"):
        q(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="floating"):
        q(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="non-negative"):
        bn_error_bound(q, -1.0)
    with pytest.raises(ValueError, match="shape"):
        bn_error_bound(q, torch.ones(5))


# ---------------------------------------------------------------- (d) trained MNIST CNN

BLOCKS = ((16, 2), (32, 2), (64, 2))


@pytest.fixture(scope="module")
def mnist() -> MnistSplits:
    try:
        return load_mnist()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def trained(mnist: MnistSplits) -> nn.Module:
    """SmallCNN (16/32/64 channels, all stride 2) after 100 Adam steps of batch 64, precise BN statistics, eval."""
    torch.manual_seed(0)
    model = SmallCNN(blocks=BLOCKS)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        idx = torch.randint(0, mnist.train_x.shape[0], (64,), generator=g)
        loss = F.cross_entropy(model(mnist.train_x[idx]), mnist.train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    recalibrate_bn(model, list(mnist.train_x[:4000].split(500)))
    return model.eval()


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(b) for b in x.split(2000)])


def test_8bit_export_keeps_mnist_accuracy(trained: nn.Module, mnist: MnistSplits) -> None:
    ref = _logits(trained, mnist.test_x)
    float_acc = float((ref.argmax(1) == mnist.test_y).double().mean())
    assert float_acc > 0.8  # the model did learn
    q = quantize_bn(trained, bits=8)
    quant_acc = float((_logits(q, mnist.test_x).argmax(1) == mnist.test_y).double().mean())
    assert abs(quant_acc - float_acc) <= 0.005, (float_acc, quant_acc)
    folded = fold_bn_into_conv(trained)
    assert float((_logits(folded, mnist.test_x[:2000]) - ref[:2000]).abs().max()) < 1e-3


def _bn_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each BatchNorm2d's real input on ``x`` (own hooks, independent of bn_input_absmax)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: seen.__setitem__(n, a[0].detach().clone()))
               for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]  # fmt: skip
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("bits", BITS)
def test_per_layer_error_within_bound_on_real_activations(trained: nn.Module, mnist: MnistSplits, bits: int) -> None:
    x = mnist.test_x[:512]
    inputs = _bn_inputs(trained, x)
    q = quantize_bn(trained, bits=bits)
    layers = quantized_layers(q)
    assert list(layers) == list(inputs) and len(layers) == len(BLOCKS)
    absmax = bn_input_absmax(trained, [x[:256], x[256:]])
    reports = measure_bn_errors(trained, q, [x])
    for name, act in inputs.items():
        bn = trained.get_submodule(name)
        assert isinstance(bn, nn.BatchNorm2d)
        x_max = _channel_max(act)
        assert torch.equal(absmax[name], x_max)
        err = _channel_max(layers[name](act).double() - _reference_bn(bn, act))
        bound = bn_error_bound(layers[name], x_max)
        assert bool((err <= bound).all()), (name, float((err - bound).max()))
        assert torch.allclose(reports[name].max_error, err, rtol=1e-6, atol=1e-12)
        assert torch.equal(reports[name].bound, bound)


def test_logit_difference_respects_bound_propagated_through_last_bn(trained: nn.Module, mnist: MnistSplits) -> None:
    """Quantize only the last BN: ReLU is 1-Lipschitz and average pooling averages, so |Δlogit_j| <=
    Σ_c |W_jc| bound_c (plus fp32 noise of the unchanged tail)."""
    x = mnist.test_x[:512]
    name = [n for n, m in trained.named_modules() if isinstance(m, nn.BatchNorm2d)][-1]
    q = quantize_bn(trained, bits=8, layers=[name])
    bound = bn_error_bound(quantized_layers(q)[name], bn_input_absmax(trained, [x])[name])
    assert isinstance(trained, SmallCNN)
    w = trained.classifier.weight.detach().double()
    propagated = w.abs() @ bound  # (classes,)
    ref, out = _logits(trained, x), _logits(q, x)
    diff = (out - ref).abs().double().amax(dim=0)
    noise = 1e-5 * (1 + float(ref.abs().max()))
    assert bool((diff <= propagated + noise).all()), (diff - propagated).max()
    assert float(diff.max()) > 0  # quantization did change something
    assert math.isfinite(float(propagated.max()))
