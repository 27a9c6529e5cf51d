"""Kronecker-factored Fisher blocks for nn.Linear, Hugging Face Conv1D and nn.Conv2d (K-FAC / KFC).

Per layer the Fisher block of vec(W) (row-major, W: d_out × d_in with the bias appended as a last column; Conv1D's
d_in × d_out weight is read transposed) is approximated by F ≈ G ⊗ A with

* Linear / Conv1D (Martens & Grosse 2015, arXiv:1503.05671 eq. 1–3): A = E[a aᵀ], G = E[ĝ ĝᵀ], a the input with a
  homogeneous 1 for the bias, ĝ = ∂(loss term)/∂s the per-term gradient w.r.t. the output. A layer applied at T
  positions of a sequence (input N × T × d_in) shares its weight over them (Eschenhagen et al., NeurIPS 2023,
  arXiv:2311.00636, §3):

  - ``kfac_approx="expand"`` (eq. 7; one loss term per position, language modelling): positions act as examples,
    A = (1/P) Σ_{n,t} a aᵀ over the P unmasked positions, G = (1/M) Σ_{n,t} ĝ ĝᵀ with M the loss terms;
  - ``"reduce"`` (eq. 9; positions pooled before the loss): A = (1/N) Σ_n ā_n ā_nᵀ with ā_n the mean of a over
    the unmasked positions of example n, G = (1/M) Σ_n (Σ_t ĝ_{n,t})(Σ_t ĝ_{n,t})ᵀ.

  With M counted from the data (:class:`ds_spngd.curvature.base.CaptureContext`) A ⊗ G is the Fisher of the loss
  per term, so damping and learning rate mean the same at every sequence length. A position whose output gradient
  is exactly zero (padding, ``ignore_index`` labels after the last kept token) is masked out of both factors.
* Conv2d (KFC, Grosse & Martens 2016, arXiv:1602.01407 eq. 23–25): a_{i,t} is the im2col patch (c_in·k_h·k_w [+1])
  at output position t ∈ T; A = E_i[Σ_t a_{i,t} a_{i,t}ᵀ] sums over positions and
  G = E_i[(1/|T|) Σ_t g_{i,t} g_{i,t}ᵀ] averages over them. ∇W = Σ_t g_t a_tᵀ.

A side (A or G) larger than ``max_factor_dim`` is block-diagonal or diagonal (``large_dim_method``;
:func:`ds_spngd.curvature.side.side_factor`), so a 50257-wide output layer never holds a dense 50257² matrix; a
block-diagonal side is one factor per diagonal block, and the block's preconditioner is drafted in *parts* (a whole
side, or one of its diagonal blocks: :meth:`KroneckerBlock.parts`), each by its own owner rank, with π from the
traces of the whole sides. The preconditioned gradient is (G ⊗ A + damping)⁻¹ vec(∇W), computed blockwise as

* ``"inverse"``: (G + (√λ/π)·I)⁻¹ ∇W (A + π√λ·I)⁻¹, π = sqrt((tr A/d_A)/(tr G/d_G)) (Martens & Grosse §6.3);
* ``"eigen"``: Q_G [(Q_Gᵀ ∇W Q_A) ⊘ (d_G d_Aᵀ + λ)] Q_Aᵀ — the exact inverse of G ⊗ A + λ·I (George et al. 2018,
  KAISA's default), with block-diagonal Q and d when blocked.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ds_spngd.curvature.base import CaptureContext, FisherBlock, PreconditionerDraft, Traces, full_shape
from ds_spngd.curvature.factor import SymmetricFactor
from ds_spngd.curvature.side import ChunkedSide, Side, chunks_of, side_factor, side_trace
from ds_spngd.linalg import InverseJob, pi_from_traces, sym_eigh

__all__ = ["KroneckerBlock", "kronecker_supported", "is_conv1d", "left_apply", "right_apply"]

DEFAULT_MAX_FACTOR_DIM = 4096


def is_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face ``transformers.pytorch_utils.Conv1D`` (y = x W + b, W: d_in × d_out), recognised
    without importing transformers."""
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(w, Tensor)
            and len(full_shape(w)) == 2 and int(full_shape(w)[1]) == int(getattr(module, "nf", -1)))


def kronecker_supported(module: nn.Module) -> str | None:
    """Return None when the module can be a Kronecker block, else the reason it falls back to the base update."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"Conv2d with groups={module.groups}"
        if module.padding_mode != "zeros":
            return f"Conv2d with padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str):
            return f"Conv2d with padding={module.padding!r}"
        return None
    return f"{type(module).__name__} has no Kronecker block"


def _as3(m: Tensor) -> Tensor:
    return m if m.dim() == 3 else m.unsqueeze(0)


def left_apply(mats: Tensor, v: Tensor) -> Tensor:
    """blockdiag(mats) @ v for mats (B × b × b, or d × d) and v ((B·b) × n, already padded)."""
    m3 = _as3(mats)
    b = m3.shape[0]
    if b == 1:
        return m3[0] @ v
    if m3.shape[-1] == 1:
        return m3.reshape(b, 1) * v
    return torch.bmm(m3, v.reshape(b, m3.shape[-1], -1)).reshape(v.shape)


def right_apply(v: Tensor, mats: Tensor) -> Tensor:
    """v @ blockdiag(mats) for v (n × (B·b), already padded) and mats (B × b × b, or d × d)."""
    m3 = _as3(mats)
    b = m3.shape[0]
    if b == 1:
        return v @ m3[0]
    if m3.shape[-1] == 1:
        return v * m3.reshape(1, b)
    return torch.einsum("nbk,bkl->nbl", v.reshape(v.shape[0], b, -1), m3).reshape(v.shape)


def _pad2(v: Tensor, rows: int, cols: int) -> Tensor:
    return v if tuple(v.shape) == (rows, cols) else F.pad(v, (0, cols - v.shape[1], 0, rows - v.shape[0]))


def _with_ones(rows: Tensor, ones: Tensor | None = None) -> Tensor:
    """Append the bias coordinate (1, or ``ones`` for masked rows) as a last column."""
    col = rows.new_ones(rows.shape[0], 1) if ones is None else ones.reshape(-1, 1).to(rows.dtype)
    return torch.cat([rows, col], dim=1)


class KroneckerBlock(FisherBlock):
    """K-FAC block of an nn.Linear, a Hugging Face Conv1D or an nn.Conv2d (groups=1, zero padding).

    Args:
        name, module, ctx: as :class:`FisherBlock`.
        max_factor_dim: a side larger than this is block-diagonal / diagonal (``large_dim_method``).
        large_dim_method: ``"block"`` or ``"diagonal"``.

    Factors: ``A`` (side d_in [+1], d_in = in_features or c_in·k_h·k_w) and ``G`` (side d_out), each a
    :class:`SymmetricFactor` of B × d × d (B = 1: dense).
    """

    kind = "kronecker"

    unsupported_reason = staticmethod(kronecker_supported)

    def __init__(self, name: str, module: nn.Module, ctx: CaptureContext,
                 max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM, large_dim_method: str = "block") -> None:
        super().__init__(name, module, ctx)
        self.is_conv = isinstance(module, nn.Conv2d)
        self.transposed = is_conv1d(module)
        w = module.weight
        assert isinstance(w, Tensor)
        shape = full_shape(w)  # (ZeRO 3 with deepspeed.zero.Init: w is empty here)
        self.d_out = int(shape[1] if self.transposed else shape[0])
        self.has_bias = getattr(module, "bias", None) is not None
        d_in = (int(shape[0]) if self.transposed else int(shape[1:].numel())) + (1 if self.has_bias else 0)
        self.max_factor_dim, self.large_dim_method = max_factor_dim, large_dim_method
        self.a: Side = side_factor(f"{name}.A", d_in, max_factor_dim, large_dim_method,
                                   final_in="forward" if self.is_conv else "backward", device=self._param_device)
        self.g: Side = side_factor(f"{name}.G", self.d_out, max_factor_dim, large_dim_method,
                                   device=self._param_device)

    @property
    def factors(self) -> list[SymmetricFactor]:
        return [*chunks_of(self.a), *chunks_of(self.g)]

    @property
    def sides(self) -> tuple[Side, Side]:
        """The (input side, output side) factors whose shapes the preconditioner has (A, G here)."""
        return self.a, self.g

    def describe(self) -> str:
        kind = "Conv2d (KFC)" if self.is_conv else ("Conv1D" if self.transposed else "Linear")
        return f"{self.name}: {kind} K-FAC, A {_shape(self.a)}, G {_shape(self.g)}"

    # ---- statistics -------------------------------------------------------------------------------------------
    def conv_rows(self, x: Tensor) -> tuple[Tensor, int]:
        """Conv2d (KFC): the im2col rows a_{i,t} of input x (N × c_in × H × W) as (N·T) × d_A (bias coordinate 1
        appended), and T, the output positions per example. (Linear / Conv1D rows: :meth:`add_sequence`.)"""
        m = self.module
        assert isinstance(m, nn.Conv2d)
        patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)  # type: ignore[arg-type]
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        return (_with_ones(rows) if self.has_bias else rows), patches.shape[-1]

    def _capture_forward(self, x: Tensor, m: int) -> Callable[[Tensor, float | Tensor], None]:
        n = int(x.shape[0])
        if self.is_conv:
            rows, t = self.conv_rows(x[:m])
            self.a.add(rows, 1.0, m)  # KFC: A sums over positions

            def on_conv_grad(gy: Tensor, scale: float | Tensor) -> None:  # KFC: G averages over positions
                out = gy.permute(0, 2, 3, 1).reshape(-1, gy.shape[1])  # N × C × H × W → positions as rows
                self.g.add(out * scale, 1.0 / t, self.ctx.terms_in(m, n))

            return on_conv_grad
        xs = x[:m]

        def on_grad(gy: Tensor, scale: float | Tensor) -> None:
            self.add_sequence(xs, gy, scale, self.ctx.terms_in(m, n))

        return on_grad

    def add_sequence(self, x: Tensor, gy: Tensor, scale: float | Tensor, terms: float | Tensor) -> None:
        """Both factors of a Linear / Conv1D from its input and output gradient (see the module docstring).

        Args:
            x: m × d_in, or m × … × d_in (positions).
            gy: the output gradient of the same examples (m × d_out or m × … × d_out), as seen by the hook.
            scale: per-term scale s (ĝ = s·gy).
            terms: M, the loss terms behind these examples (G's count).
        """
        m = int(x.shape[0])
        d_in, d_out = x.shape[-1], gy.shape[-1]
        xc, gc = self.a.cast(x), self.g.cast(gy)  # the factors' product dtype (bf16 or fp32, ``factor_dtype``)
        if x.dim() == 2:  # one position per example (or flattened tokens): the per-example K-FAC, masked alike
            live = (gc.detach().reshape(m, -1).abs().amax(dim=-1) > 0).to(torch.float32)
            rows = xc * live.unsqueeze(-1).to(xc.dtype)
            self.a.add(_with_ones(rows, live) if self.has_bias else rows, 1.0, live.sum())
            self.g.add(gc.reshape(m, -1) * scale, 1.0, terms)
            return
        x3, g3 = xc.reshape(m, -1, d_in), gc.reshape(m, -1, d_out)
        mask = (g3.detach().abs().amax(dim=-1) > 0).to(torch.float32)  # m × T: positions that reach a loss term
        if self.ctx.kfac_approx == "reduce":
            per = mask.sum(1)
            abar = (x3.float() * mask.unsqueeze(-1)).sum(1) / per.clamp_min(1.0).unsqueeze(-1)
            self.a.add(_with_ones(abar, (per > 0).float()) if self.has_bias else abar, 1.0, (per > 0).float().sum())
            self.g.add(g3.float().sum(1) * scale, 1.0, terms)
            return
        rows = (x3 * mask.unsqueeze(-1).to(x3.dtype)).reshape(-1, d_in)
        self.a.add(_with_ones(rows, mask) if self.has_bias else rows, 1.0, mask.sum())
        self.g.add(g3.reshape(-1, d_out) * scale, 1.0, terms)  # masked rows are zero already

    # ---- preconditioner (per part: a side, or one chunk of a chunked side; :mod:`ds_spngd.curvature.side`) ------
    def side_layers(self) -> tuple[tuple[Side, ...], tuple[Side, ...]]:
        """(input side, output side), each as the aligned factors its value is combined from (here one each)."""
        return (self.a,), (self.g,)

    def combine_parts(self, side: int, values: list[Tensor | None], traces: Traces) -> Tensor:
        """The value of one part of ``side`` (0 input, 1 output) from its factors' values (B_k × b × b)."""
        v = values[0]
        if v is None:
            raise RuntimeError(f"{self.name}: its factors have no value on this rank (only the owner drafts)")
        return v

    def side_mean_traces(self, traces: Traces) -> tuple[Tensor, Tensor]:
        """Mean traces (over real coordinates) of the combined input and output sides, from the factors' traces."""
        return side_trace(self.a, traces) / self.a.size, side_trace(self.g, traces) / self.g.size

    def _pieces(self) -> list[tuple[int, int]]:
        """(side, chunk) of every piece of the preconditioner: a whole side (chunk −1) or one chunk of a chunked one."""
        out = []
        for side, layers in enumerate(self.side_layers()):
            n = len(chunks_of(layers[0]))
            out += [(side, -1)] if n == 1 else [(side, k) for k in range(n)]
        return out

    def _piece_factors(self, piece: tuple[int, int]) -> list[SymmetricFactor]:
        side, k = piece
        return [chunks_of(x)[max(k, 0)] for x in self.side_layers()[side]]

    def _parts(self) -> list[list[int]]:
        """Piece indices per part: the whole sides together (one owner, as for any block), each chunk alone."""
        pieces = self._pieces()
        whole = [p for p, (_, k) in enumerate(pieces) if k < 0]
        return ([whole] if whole else []) + [[p] for p, (_, k) in enumerate(pieces) if k >= 0]

    def parts(self) -> list[list[SymmetricFactor]]:
        pieces = self._pieces()
        return [[f for p in part for f in self._piece_factors(pieces[p])] for part in self._parts()]

    def _draft_piece(self, piece: tuple[int, int], damping: float, method: str,
                     traces: Traces) -> PreconditionerDraft:
        side, _ = piece
        m = self.combine_parts(side, [f.value for f in self._piece_factors(piece)], traces)
        if method == "inverse":
            pi = pi_from_traces(*self.side_mean_traces(traces))  # a 0-d tensor: no host sync
            sq = math.sqrt(damping)
            job = InverseJob.start(m, pi * sq if side == 0 else sq / pi)
            return PreconditionerDraft([job], lambda: [job.inverse])
        if method == "eigen":
            d, q = sym_eigh(m, check=False)
            return PreconditionerDraft([], lambda: [q, d])
        raise ValueError(f"unknown inverse_method {method!r}")

    def draft_part(self, k: int, damping: float, method: str, traces: Traces) -> PreconditionerDraft:
        """Owner of part k: per piece, its damped inverse ((X + π√λ·I)⁻¹ input side, (X + √λ/π·I)⁻¹ output side;
        π from the *whole* sides' traces, Martens & Grosse §6.3) or its eigendecomposition (q, d), as B_k × b × b
        tensors (and B_k × b eigenvalues)."""
        traces = {**self.local_traces(), **traces}  # the all-reduced traces of parts held elsewhere, if any
        pieces = self._pieces()
        drafts = [self._draft_piece(pieces[p], damping, method, traces) for p in self._parts()[k]]
        return PreconditionerDraft([j for d in drafts for j in d.jobs], lambda: [t for d in drafts for t in d.build()])

    def part_shapes(self, k: int, method: str) -> list[tuple[int, ...]]:
        out: list[tuple[int, ...]] = []
        for p in self._parts()[k]:
            f = self._piece_factors(self._pieces()[p])[0]
            out += [(f.blocks, f.dim, f.dim)] if method == "inverse" else [(f.blocks, f.dim, f.dim), (f.blocks, f.dim)]
        return out

    def assemble(self, tensors: list[list[Tensor]], method: str, damping: float) -> list[Tensor]:
        """The block's preconditioner (:meth:`preconditioner_shapes`) from every part's tensors."""
        per_piece: dict[int, list[Tensor]] = {}
        n = 1 if method == "inverse" else 2
        for part, ts in zip(self._parts(), tensors, strict=True):
            for j, p in enumerate(part):
                per_piece[p] = ts[j * n : (j + 1) * n]
        per_side: list[list[list[Tensor]]] = [[], []]
        for p, (side, _) in enumerate(self._pieces()):
            per_side[side].append(per_piece[p])
        first = [_squeeze(torch.cat([ts[0] for ts in pieces])) for pieces in per_side]
        if method == "inverse":
            return first
        d_a, d_g = (torch.cat([ts[1].reshape(-1) for ts in pieces]) for pieces in per_side)
        return [*first, 1.0 / (d_g.reshape(-1, 1) * d_a.reshape(1, -1) + damping)]

    def install_parts(self, tensors: list[list[Tensor]], method: str, damping: float) -> None:
        self.install_preconditioner(self.assemble(tensors, method, damping), method)

    def local_traces(self) -> Traces:
        """Factor name → trace over its real coordinates, for the factors whose value this rank holds."""
        return {f.name: t for f in self.factors if (t := f.trace()) is not None}

    def side_values(self) -> tuple[Tensor, Tensor]:
        """The combined (input side, output side) values, B × b × b each, from the factors held here."""
        traces = self.local_traces()
        out: list[list[Tensor]] = [[], []]
        for piece in self._pieces():
            out[piece[0]].append(self.combine_parts(piece[0], [f.value for f in self._piece_factors(piece)], traces))
        return torch.cat(out[0]), torch.cat(out[1])

    def draft_preconditioner(self, damping: float, method: str) -> PreconditionerDraft:
        traces = self.local_traces()
        drafts = [self.draft_part(k, damping, method, traces) for k in range(len(self.parts()))]
        return PreconditionerDraft([j for d in drafts for j in d.jobs],
                                   lambda: self.assemble([d.build() for d in drafts], method, damping))

    def preconditioner_shapes(self, method: str) -> list[tuple[int, ...]]:
        fa, fg = self.sides
        shapes = [_side_shape(fa), _side_shape(fg)]
        return shapes if method == "inverse" else [*shapes, (fg.padded, fa.padded)]

    def grad_matrix(self, grads: list[Tensor]) -> Tensor:
        """[∇W | ∇b] as a d_out × d_A fp32 matrix (Conv1D's weight gradient transposed)."""
        w = grads[0].float()
        gw = w.t() if self.transposed else w.reshape(self.d_out, -1)
        if self.has_bias:
            gw = torch.cat([gw, grads[1].float().reshape(self.d_out, 1)], dim=1)
        return gw

    def split_matrix(self, v: Tensor, like: list[Tensor]) -> list[Tensor]:
        """Inverse of :meth:`grad_matrix`."""
        w = v[:, :-1] if self.has_bias else v
        out = [(w.t() if self.transposed else w).reshape(like[0].shape)]
        if self.has_bias:
            out.append(v[:, -1].reshape(like[1].shape))
        return out

    def precondition(self, grads: list[Tensor]) -> list[Tensor]:
        if self._inverse is None:
            raise RuntimeError(f"{self.name}: precondition() before a preconditioner was installed")
        fa, fg = self.sides
        v = self.grad_matrix(grads)
        rows, cols = v.shape
        vp = _pad2(v, fg.padded, fa.padded)
        if self._method == "inverse":
            a_inv, g_inv = self._inverse
            out = right_apply(left_apply(g_inv, vp), a_inv)
        else:
            q_a, q_g, scale = self._inverse
            inner = right_apply(left_apply(q_g.transpose(-2, -1), vp), q_a) * scale
            out = right_apply(left_apply(q_g, inner), q_a.transpose(-2, -1))
        return self.split_matrix(out[:rows, :cols], grads)


def _squeeze(t: Tensor) -> Tensor:
    """A one-block B × d × d tensor as d × d (dense preconditioners keep their historical 2-D shape)."""
    return t[0].contiguous() if t.dim() == 3 and t.shape[0] == 1 else t.contiguous()


def _side_shape(f: Side) -> tuple[int, ...]:
    return (f.dim, f.dim) if f.blocks == 1 else (f.blocks, f.dim, f.dim)


def _shape(f: Side) -> str:
    if isinstance(f, ChunkedSide):
        return f"{f.blocks} blocks of {f.dim}x{f.dim} (side {f.size}), one owner each"
    if f.blocks == 1:
        return f"{f.dim}x{f.dim}"
    if f.dim == 1:
        return f"diagonal {f.size}"
    return f"{f.blocks} blocks of {f.dim}x{f.dim} (side {f.size})"
