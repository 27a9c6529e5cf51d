"""Fixed-point export of eval-mode BatchNorm: fold into the preceding layer, or integer multipliers with one shared
power-of-two scale per layer, with a provable per-channel error bound.

Scheme
------
In eval mode a BatchNorm layer is the per-channel affine map ``y_c = γ_c (x_c − μ_c) / sqrt(σ²_c + ε) + β_c
= s_c x_c + t_c`` with ``s_c = γ_c / sqrt(σ²_c + ε)`` and ``t_c = β_c − μ_c s_c`` (running statistics ``μ``, ``σ²``).

*Folding* (:func:`ds_spngd_lab.export.bn_fold.fold_bn_into_conv`): where the BN directly follows a convolution /
Linear layer ``z = W x + b``,
``W' = diag(s) W`` and ``b' = s ⊙ b + t`` reproduce ``BN(z)`` exactly in real arithmetic: the batch-normalisation
folding of Krishnamoorthi 2018 ("Quantizing deep convolutional networks for efficient inference: A whitepaper",
arXiv:1806.08342) and of Jacob et al. 2018 (below), here with the eval-mode statistics. The fold is done in float64
and rounded once to the parameter dtype.

*Fixed-point BN* (:func:`quantize_bn`, :class:`QuantizedBatchNorm`): each layer gets ONE shared scale ``2^-k``
(``k`` = "fractional bits", an integer, possibly negative) and integer per-channel multipliers and offsets,

    s_c ≈ m_c · 2^-k,   t_c ≈ b_c · 2^-k,   y_c = (m_c x_c + b_c) · 2^-k,

with ``m_c = round(s_c 2^k)`` in the symmetric signed ``bits``-bit range ``|m_c| <= 2^(bits-1) − 1`` and
``b_c = round(t_c 2^k)`` in the signed ``bias_bits``-bit range (default 32 for ``bits <= 16``, else 64). ``k`` is
the largest integer with ``max_c |s_c| · 2^k <= 2^(bits-1) − 1``, so the largest multiplier uses the full range
(``max_c |m_c| >= 2^(bits-2)``) and no multiplier is clipped. This is the integer-arithmetic-only inference recipe of
Jacob et al. 2018 ("Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference",
CVPR 2018, arXiv:1712.05877, section 2): a real multiplier written as an integer times a power of two
(``M = 2^-n M_0``), and the additive term held as a wide integer at the product's scale (their int32 bias at scale
``S_1 S_2``, section 2.4), here applied per BN channel with a per-layer shared exponent. It is standard post-training
quantization, not a scheme from the SP-NGD papers (Osawa et al.); it exports what large-batch training produced.

Rounding error: ``|Δs_c| = |m_c 2^-k − s_c| <= 2^-(k+1)`` and ``|Δt_c| <= 2^-(k+1)``, so for inputs with
``|x_c| <= X_c`` the output error is at most ``|Δs_c| X_c + |Δt_c|`` (:func:`bn_error_bound`), halving per extra bit.
The inputs ``x`` stay floating point here (the integer parameters are what is exported, activations are not
quantized); :meth:`QuantizedBatchNorm.forward` evaluates ``(m x + b) 2^-k`` in floating point, and the bound adds a
term for that rounding.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BATCH_NORMS", "BNErrorReport", "QuantizedBatchNorm", "bn_error_bound", "bn_input_absmax",
           "bn_scale_shift", "check_all_bns", "check_bn", "measure_bn_errors", "quantize_bn", "quantized_layers",
           "replace_module", "shared_frac_bits"]  # fmt: skip

#: the BatchNorm classes that are folded / quantized
BATCH_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
MIN_BITS, MAX_BITS = 2, 32
MAX_BIAS_BITS = 64
#: |k| limit: 2^-k must be a normal float32 number
MAX_FRAC_BITS = 126
_U64 = 2.0**-53  # float64 unit roundoff
_ModuleT = TypeVar("_ModuleT", bound=nn.Module)
_PreHook = Callable[[nn.Module, tuple[torch.Tensor, ...]], None]


def _absmax(t: torch.Tensor) -> float:
    """``max |t|`` as a float, 0.0 for an empty tensor."""
    return float(t.abs().max()) if t.numel() else 0.0


def check_bn(bn: nn.Module, name: str) -> _BatchNorm:
    """Return ``bn`` if it is an eval-mode BatchNorm with finite running statistics and affine params.

    Raises:
        ValueError: otherwise (message names the layer and the problem).
    """
    label = name or "(root)"
    if not isinstance(bn, BATCH_NORMS) or not isinstance(bn, _BatchNorm):
        raise ValueError(f"{label} is a {type(bn).__name__}, not one of {[c.__name__ for c in BATCH_NORMS]}")
    if bn.training:
        raise ValueError(f"BatchNorm {label} is in training mode; call model.eval() before exporting")
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None:
        raise ValueError(f"BatchNorm {label} has no running statistics (track_running_stats=False)")
    tensors = [mean, var] + ([bn.weight, bn.bias] if bn.affine else [])
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise ValueError(f"BatchNorm {label} has NaN/Inf running statistics or affine parameters")
    if bool((var.double() + bn.eps <= 0).any()):
        raise ValueError(f"BatchNorm {label} has running_var + eps <= 0")
    return bn


@torch.no_grad()
def bn_scale_shift(bn: nn.Module, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode BN as ``y = s·x + t`` per channel.

    Returns:
        ``(s, t)``, each float64 of shape ``(C,)`` on the BN's device: ``s = γ / sqrt(σ² + ε)``,
        ``t = β − μ s`` (``γ = 1``, ``β = 0`` without affine parameters).

    Raises:
        ValueError: not a BatchNorm, training mode, no running statistics, or non-finite values.
    """
    norm = check_bn(bn, name)
    assert norm.running_mean is not None and norm.running_var is not None
    mean, var = norm.running_mean.double(), norm.running_var.double()
    gamma = norm.weight.double() if norm.affine else torch.ones_like(mean)
    beta = norm.bias.double() if norm.affine else torch.zeros_like(mean)
    s = gamma / torch.sqrt(var + norm.eps)
    return s, beta - mean * s


def _check_bits(bits: int, bias_bits: int | None) -> int:
    """Validate the bit widths; return the effective ``bias_bits`` (default 32 for ``bits <= 16``, else 64)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    if bias_bits is None:
        return 32 if bits <= 16 else 64
    if isinstance(bias_bits, bool) or not isinstance(bias_bits, int) or not bits <= bias_bits <= MAX_BIAS_BITS:
        raise ValueError(f"bias_bits must be an integer in [bits={bits}, {MAX_BIAS_BITS}], got {bias_bits!r}")
    return bias_bits


def shared_frac_bits(max_abs: float, qmax: int) -> int:
    """Largest integer ``k`` with ``max_abs · 2^k <= qmax`` (exact: checked with ``math.ldexp``).

    Args:
        max_abs: largest magnitude to represent, finite and > 0.
        qmax: largest integer magnitude, >= 1.

    Raises:
        ValueError: ``max_abs`` not finite and positive, ``qmax < 1``, or ``|k| > MAX_FRAC_BITS`` (126).
    """
    if not (math.isfinite(max_abs) and max_abs > 0) or qmax < 1:
        raise ValueError(f"need finite max_abs > 0 and qmax >= 1, got {max_abs}, {qmax}")
    k = math.floor(math.log2(qmax) - math.log2(max_abs))
    while math.ldexp(max_abs, k) > qmax:  # guard log2 rounding at the boundaries
        k -= 1
    while math.ldexp(max_abs, k + 1) <= qmax:
        k += 1
    if abs(k) > MAX_FRAC_BITS:
        raise ValueError(f"max |value| {max_abs:g} needs a shared scale 2^{-k}, outside the float32 exponent range")
    return k


class QuantizedBatchNorm(nn.Module):
    """Eval-mode BatchNorm as ``y = (m ⊙ x + b) · 2^-k`` with integer ``m``, ``b`` and one exponent ``k``.

    Buffers: ``multiplier`` (``m``) and ``offset`` (``b``), int64 of shape ``(C,)``, with ``|m| <= 2^(bits-1) − 1``
    and ``|b| <= 2^(bias_bits-1) − 1``; ``frac_bits`` (``k``), a 0-d int64; ``ref_scale`` / ``ref_shift`` (float64
    ``(C,)``): the exact ``s``, ``t`` of the source BN, kept for :func:`bn_error_bound`. Build with
    :meth:`from_batchnorm`. The forward takes ``(N, C, *)`` floating input and returns the same shape and dtype.
    """

    multiplier: torch.Tensor
    offset: torch.Tensor
    frac_bits: torch.Tensor
    ref_scale: torch.Tensor
    ref_shift: torch.Tensor

    def __init__(self, multiplier: torch.Tensor, offset: torch.Tensor, frac_bits: int, bits: int, bias_bits: int,
                 ref_scale: torch.Tensor, ref_shift: torch.Tensor) -> None:  # fmt: skip
        super().__init__()
        _check_bits(bits, bias_bits)
        c = multiplier.shape
        if multiplier.dim() != 1 or offset.shape != c or ref_scale.shape != c or ref_shift.shape != c:
            raise ValueError(f"multiplier, offset, ref_scale, ref_shift must share one (C,) shape, got {c}, "
                             f"{offset.shape}, {ref_scale.shape}, {ref_shift.shape}")  # fmt: skip
        if multiplier.dtype != torch.int64 or offset.dtype != torch.int64:
            raise ValueError(f"multiplier and offset must be int64, got {multiplier.dtype}, {offset.dtype}")
        if _absmax(multiplier) > 2 ** (bits - 1) - 1:
            raise ValueError(f"a multiplier exceeds the signed {bits}-bit range")
        if _absmax(offset) > 2 ** (bias_bits - 1) - 1:
            raise ValueError(f"an offset exceeds the signed {bias_bits}-bit range")
        if abs(frac_bits) > MAX_FRAC_BITS:
            raise ValueError(f"|frac_bits| must be <= {MAX_FRAC_BITS}, got {frac_bits}")
        self.bits, self.bias_bits = bits, bias_bits
        self.register_buffer("multiplier", multiplier.clone())
        self.register_buffer("offset", offset.clone())
        self.register_buffer("frac_bits", torch.tensor(int(frac_bits), dtype=torch.int64, device=multiplier.device))
        self.register_buffer("ref_scale", ref_scale.to(torch.float64).clone())
        self.register_buffer("ref_shift", ref_shift.to(torch.float64).clone())

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, bits: int = 8, bias_bits: int | None = None,
                       name: str = "") -> QuantizedBatchNorm:  # fmt: skip
        """Quantize an eval-mode BatchNorm (see the module docstring for the scheme).

        Raises:
            ValueError: ``bits`` outside [2, 32] or ``bias_bits`` outside [bits, 64]; BN in training mode, without
                running statistics or with non-finite values; an offset ``b_c`` that does not fit ``bias_bits``;
                a shared scale outside the float32 exponent range.
        """
        bias_bits = _check_bits(bits, bias_bits)
        s, t = bn_scale_shift(bn, name)
        qmax, bias_qmax = 2 ** (bits - 1) - 1, 2 ** (bias_bits - 1) - 1
        s_max, t_max = _absmax(s), _absmax(t)
        if s_max > 0:
            k = shared_frac_bits(s_max, qmax)
        else:  # every γ is 0 (e.g. zero-γ init): the scale only has to carry t
            k = shared_frac_bits(t_max, bias_qmax) if t_max > 0 else 0
        m = torch.round(s * 2.0**k)  # exact power-of-two scaling, then round half to even
        b = torch.round(t * 2.0**k)
        if _absmax(b) >= 2.0 ** (bias_bits - 1):
            raise ValueError(f"BatchNorm {name or '(root)'}: offset max|t| = {t_max:g} at scale 2^{-k} needs more than "
                             f"{bias_bits} bits; pass a larger bias_bits or fewer bits")  # fmt: skip
        return cls(m.to(torch.int64), b.to(torch.int64), k, bits, bias_bits, s, t)

    @property
    def num_features(self) -> int:
        """Number of channels ``C``."""
        return int(self.multiplier.shape[0])

    def scale(self) -> torch.Tensor:
        """Dequantized ``m · 2^-k``, float64 ``(C,)`` (exact)."""
        return self.multiplier.to(torch.float64) * 2.0 ** -int(self.frac_bits)

    def shift(self) -> torch.Tensor:
        """Dequantized ``b · 2^-k``, float64 ``(C,)`` (exact for ``|b| <= 2^53``, i.e. as built)."""
        return self.offset.to(torch.float64) * 2.0 ** -int(self.frac_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, *)`` floating input to ``(m x + b) 2^-k`` of the same shape and dtype.

        Evaluated in the input dtype for float32 / float64 inputs when ``m`` and ``b`` are exact in it (the power-of-two
        scaling is exact), else in float64 and rounded once to the input dtype (float16 / bfloat16, wide integers).

        Raises:
            ValueError: non-floating input, fewer than 2 dimensions or ``x.shape[1] != C``.
        """
        if not x.dtype.is_floating_point:
            raise ValueError(f"expected floating input, got {x.dtype}")
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected input (N, {self.num_features}, *), got {tuple(x.shape)}")
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float64
        limit = 2.0 / torch.finfo(dtype).eps  # integers up to this magnitude are exact in dtype (2^24 for float32)
        if _absmax(self.multiplier) > limit or _absmax(self.offset) > limit:
            dtype = torch.float64
        shape = (1, -1) + (1,) * (x.dim() - 2)
        m = self.multiplier.to(dtype).view(shape)
        b = self.offset.to(dtype).view(shape)
        return torch.addcmul(b, m, x.to(dtype)).mul_(2.0 ** -int(self.frac_bits)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, bits={self.bits}, bias_bits={self.bias_bits}, frac_bits={int(self.frac_bits)}"


def bn_error_bound(layer: QuantizedBatchNorm, x_absmax: float | torch.Tensor, *, dtype: torch.dtype = torch.float32,
                   worst_case: bool = False) -> torch.Tensor:  # fmt: skip
    """Provable per-channel bound on ``|layer(x) − (s x + t)|`` for all inputs with ``|x_c| <= x_absmax_c``.

    Rounding term ``|Δs_c| X_c + |Δt_c|`` with ``Δs = m 2^-k − s``, ``Δt = b 2^-k − t`` (``worst_case=True`` uses
    their a-priori limit ``2^-(k+1)`` instead of the actual values), plus a floating-point evaluation term
    ``(3u + 16 u64)(|s| X + |t| + |m 2^-k| X + |b 2^-k|) + tiny·eps`` with ``u`` the unit roundoff of ``dtype``:
    the forward's ``m x + b`` in ``dtype`` rounds at most twice (``<= (2u + u²)(|m x| + |b|)``; the power-of-two
    scaling is exact), or, on the float64 path, ``<= 3 u64`` relative plus one final rounding ``u`` to ``dtype``;
    ``16 u64`` also covers computing ``s``, ``t`` in float64 (a few ``u64`` relative), and ``tiny·eps`` (the
    subnormal spacing of ``dtype``) a result that underflows. ``s x + t`` is the BN in real arithmetic on the stored
    float parameters. First-order in ``u``, which is ample: the constants exceed the first-order coefficients.

    Args:
        layer: the quantized BN.
        x_absmax: ``X``: a float or a ``(C,)`` tensor of per-channel maximum input magnitudes (same units as x).
        dtype: the floating dtype the layer's input (and output) has.
        worst_case: use the a-priori ``2^-(k+1)`` rounding limits (shows the 2x-per-bit shrink exactly).

    Returns:
        float64 tensor ``(C,)`` on ``layer``'s device, in the output's units.

    Raises:
        ValueError: ``x_absmax`` negative, non-finite or not broadcastable to ``(C,)``; ``dtype`` not floating.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    dev = layer.multiplier.device
    x_max = torch.as_tensor(x_absmax, dtype=torch.float64, device=dev)
    if x_max.dim() > 1 or (x_max.dim() == 1 and x_max.shape[0] not in (1, layer.num_features)):
        raise ValueError(f"x_absmax must be a scalar or of shape ({layer.num_features},), got {tuple(x_max.shape)}")
    if not bool(torch.isfinite(x_max).all()) or bool((x_max < 0).any()):
        raise ValueError("x_absmax must be finite and non-negative")
    x_max = x_max.expand(layer.num_features)
    s, t, sq, tq = layer.ref_scale, layer.ref_shift, layer.scale(), layer.shift()
    if worst_case:
        half_step = torch.full_like(s, 2.0 ** (-int(layer.frac_bits) - 1))
        ds, dt = half_step, half_step
    else:
        ds, dt = (sq - s).abs(), (tq - t).abs()
    info = torch.finfo(dtype)
    magnitude = (s.abs() + sq.abs()) * x_max + t.abs() + tq.abs()
    return ds * x_max + dt + (1.5 * info.eps + 16 * _U64) * magnitude + info.tiny * info.eps


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted submodule path ``name`` of ``root``."""
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, module)


def check_all_bns(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, BATCH_NORMS):
            check_bn(module, name)


@torch.no_grad()
def quantize_bn(model: _ModuleT, bits: int = 8, bias_bits: int | None = None,
                layers: Iterable[str] | None = None) -> _ModuleT:  # fmt: skip
    """A deep copy of ``model`` whose BatchNorm layers are :class:`QuantizedBatchNorm` (the rest is unchanged).

    Args:
        model: the trained model, in eval mode.
        bits: signed width of the per-channel multipliers ``m_c``, in [2, 32].
        bias_bits: signed width of the offsets ``b_c``, in [bits, 64]; ``None``: 32 for ``bits <= 16``, else 64.
        layers: qualified names of the BN layers to quantize; ``None``: all of them.

    Raises:
        ValueError: bad widths; a BN in training mode, without running statistics or with non-finite values; an
            offset that does not fit ``bias_bits``; a name in ``layers`` that is not a BatchNorm of ``model``.
    """
    _check_bits(bits, bias_bits)
    names = [n for n, m in model.named_modules() if isinstance(m, BATCH_NORMS)]
    if layers is not None:
        wanted = list(layers)
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise ValueError(f"not BatchNorm layers of the model: {unknown} (BatchNorm layers: {names})")
        names = [n for n in names if n in set(wanted)]
    for name in names:
        check_bn(model.get_submodule(name), name)
    quantized = copy.deepcopy(model)
    for name in names:
        bn = quantized.get_submodule(name)
        replace_module(quantized, name, QuantizedBatchNorm.from_batchnorm(bn, bits, bias_bits, name))
    return quantized


def quantized_layers(model: nn.Module) -> dict[str, QuantizedBatchNorm]:
    """Every :class:`QuantizedBatchNorm` of ``model`` by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedBatchNorm)}


@torch.no_grad()
def bn_input_absmax(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-channel ``max |x|`` of the input of every BatchNorm / :class:`QuantizedBatchNorm` over ``model(batch)``.

    Returns:
        qualified name -> float64 ``(C,)`` (CPU), in module order; the model's mode is not changed.

    Raises:
        ValueError: ``batches`` is empty.
    """
    targets = {n: m for n, m in model.named_modules() if isinstance(m, BATCH_NORMS + (QuantizedBatchNorm,))}
    found: dict[str, torch.Tensor] = {}

    def hook(name: str) -> _PreHook:
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach()
            amax = x.abs().transpose(0, 1).reshape(x.shape[1], -1).amax(dim=1).double().cpu()
            found[name] = amax if name not in found else torch.maximum(found[name], amax)

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    try:
        count = 0
        for x in batches:
            model(x)
            count += 1
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("batches is empty")
    return {n: found[n] for n in targets if n in found}


@dataclass(frozen=True)
class BNErrorReport:
    """One BN layer measured on real activations (all float64 ``(C,)`` CPU tensors, in the BN output's units).

    Attributes:
        x_absmax: per-channel max |input| seen.
        max_error: per-channel max ``|QuantizedBatchNorm(x) − (s x + t)|`` (``s x + t`` evaluated in float64).
        bound: :func:`bn_error_bound` at ``x_absmax`` for the activations' dtype.
    """

    x_absmax: torch.Tensor
    max_error: torch.Tensor
    bound: torch.Tensor


@torch.no_grad()
def measure_bn_errors(
    model: nn.Module, quantized: nn.Module, batches: Iterable[torch.Tensor]
) -> dict[str, BNErrorReport]:
    """Run ``model`` (eval-mode BN) on ``batches`` and apply, to each BN layer's real input, the same-named
    :class:`QuantizedBatchNorm` of ``quantized`` (from :func:`quantize_bn` of ``model``).

    Returns:
        BN name -> :class:`BNErrorReport`, for the BN layers that ``quantized`` replaced.

    Raises:
        ValueError: ``batches`` is empty, or a BN of ``model`` is in training mode / lacks running statistics.
    """
    qlayers = quantized_layers(quantized)
    bns = {n: model.get_submodule(n) for n in qlayers}
    exact = {n: bn_scale_shift(bn, n) for n, bn in bns.items()}
    absmax: dict[str, torch.Tensor] = {}
    error: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}

    def hook(name: str) -> _PreHook:
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach()
            shape = (1, -1) + (1,) * (x.dim() - 2)
            s, t = (v.to(x.device).view(shape) for v in exact[name])
            diff = (qlayers[name](x).double() - (s * x.double() + t)).abs()

            def per_channel(v: torch.Tensor) -> torch.Tensor:
                return v.transpose(0, 1).reshape(v.shape[1], -1).amax(dim=1).double().cpu()

            a, e = per_channel(x.abs()), per_channel(diff)
            absmax[name] = a if name not in absmax else torch.maximum(absmax[name], a)
            error[name] = e if name not in error else torch.maximum(error[name], e)
            dtypes[name] = x.dtype

        return record

    handles = [bn.register_forward_pre_hook(hook(n)) for n, bn in bns.items()]
    try:
        count = sum(1 for x in batches if model(x) is not None)
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("batches is empty")
    return {n: BNErrorReport(absmax[n], error[n], bn_error_bound(qlayers[n], absmax[n], dtype=dtypes[n]).cpu())
            for n in qlayers if n in absmax}  # fmt: skip
