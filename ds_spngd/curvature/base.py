"""Common machinery of a Fisher block: hook registration and the capture context shared by all blocks.

Statistics are captured by module hooks, never by reading ``p.grad`` (ZeRO frees it):

* a forward hook sees the layer input (for A, or x̂ for unit-wise blocks) and, on a factor-update step, registers a
  tensor hook on the layer output;
* the tensor hook sees ∂L/∂(output) during backward (for G). The gradient seen there is that of the *reduced* loss;
  :meth:`CaptureContext.example_scale` turns it into the per-example gradient ∂ℓ_i/∂s_i.

On steps that do not refresh factors both hooks return at once, so the non-refresh step costs the same as SGD's; so
do they for a block none of whose factors is due (``stale_statistics``: :attr:`SymmetricFactor.due`).

A block's preconditioner is built in two stages so that no rank can fail alone between collectives: its owner rank
*drafts* it (:meth:`FisherBlock.draft_preconditioner`: Cholesky jobs whose status is checked for all blocks at once,
see :mod:`ds_spngd.linalg`), every rank agrees that every draft succeeded, and only then is it *installed*
(:meth:`FisherBlock.install_preconditioner`) — on every rank from the same flat buffer, so all ranks precondition
with the same bits in the same memory layout.
"""

from __future__ import annotations

import copy
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ds_spngd.curvature.factor import SymmetricFactor
from ds_spngd.linalg import InverseJob

__all__ = ["CaptureContext", "FisherBlock", "PreconditionerDraft", "Traces", "full_numel", "full_shape"]


def full_shape(p: Tensor) -> torch.Size:
    """A parameter's logical shape: ``p.shape``, or, for a parameter an engine partitioned in place, the shape it
    recorded (DeepSpeed ZeRO-3 leaves an empty tensor between forward passes and keeps the shape as ``ds_shape``;
    read by name, no DeepSpeed import)."""
    shape = getattr(p, "ds_shape", None)
    return torch.Size(shape) if shape is not None else p.shape


def full_numel(p: Tensor) -> int:
    """Elements of :func:`full_shape`."""
    return int(full_shape(p).numel())

Traces = dict[str, Tensor]  # factor name → trace over its real coordinates (0-d fp32), identical on every rank


@dataclass
class PreconditionerDraft:
    """A block's new preconditioner as computed on its owner, before every rank agreed to install it.

    Attributes:
        jobs: Cholesky inverses still to be checked (:func:`ds_spngd.linalg.finish_inverses`).
        build: gives the tensors (in :meth:`FisherBlock.preconditioner_shapes` order) once the jobs are finished.
    """

    jobs: list[InverseJob]
    build: Callable[[], list[Tensor]]


@dataclass
class CaptureContext:
    """State shared by every block's hooks (one per optimizer).

    Attributes:
        collecting: True while the current optimizer step refreshes factors (set by the optimizer).
        fisher_type: ``"emp"`` (G from the training backward) or ``"mc"`` (G from a sampled-label backward).
        phase: ``"train"`` during the user's backward, ``"mc"`` during the optimizer's sampled-label backward.
        loss_reduction: ``"mean"`` or ``"sum"`` — how the training loss reduces over its terms in a micro-batch.
        kfac_approx: ``"expand"`` or ``"reduce"`` — how a layer applied at several positions of a sequence is
            approximated (Eschenhagen et al., NeurIPS 2023, arXiv:2311.00636).
        grad_accum_steps: DeepSpeed's gradient_accumulation_steps (the engine divides the loss by it).
        loss_scale: callable giving the current loss scale (1 without fp16).
        track_output: called with every hooked layer output on refresh steps (the MC Fisher's backward targets).
        sample_fraction: fraction of each micro-batch's examples (the first ⌈f·N⌉) that enter the factors.
        terms: per example of the current micro-batch, the number of loss terms it holds (an N-vector on the
            device, set from the model output's gradient before any layer's backward hook runs: a token whose
            label is ignored has an exactly zero gradient row), or None when unknown (then every example is one
            term).
        factor_seconds: wall time spent building factors in the hooks since the optimizer last read it (s).
    """

    collecting: bool = True
    fisher_type: str = "emp"
    phase: str = "train"
    loss_reduction: str = "mean"
    kfac_approx: str = "expand"
    grad_accum_steps: int = 1
    loss_scale: Callable[[], float] = field(default=lambda: 1.0)
    track_output: Callable[[Tensor], None] | None = None
    sample_fraction: float = 1.0
    terms: Tensor | None = None
    output_id: int | None = None
    factor_seconds: float = 0.0

    def count_terms(self, grad: Tensor) -> None:
        """Set :attr:`terms` from the model output's gradient (N × C or N × … × V): per example, the rows that are
        not exactly zero. Called by whichever hook sees that gradient first (the model-level hook, or the block of
        the layer whose output *is* the model output, whose tensor hook runs before the model-level one)."""
        if self.terms is not None or self.phase != "train":
            return
        g = grad.detach()
        rows = g.reshape(g.shape[0], -1, g.shape[-1]) if g.dim() > 2 else g.unsqueeze(1)
        self.terms = (rows.abs().amax(dim=-1) > 0).sum(dim=1).to(torch.float32)

    def sample_size(self, n: int) -> int:
        """Number of leading examples of an n-example micro-batch used for the factors (at least 1)."""
        return n if self.sample_fraction >= 1.0 else max(1, math.ceil(self.sample_fraction * n))

    def accepts_grad(self) -> bool:
        """Whether a gradient seen now belongs to the Fisher estimate (emp: training backward; mc: sampled one)."""
        return self.phase == ("mc" if self.fisher_type == "mc" else "train")

    def _terms_for(self, n: int) -> Tensor | None:
        t = self.terms
        return t if t is not None and t.shape[0] == n else None

    def terms_in(self, m: int, n: int) -> float | Tensor:
        """Loss terms among the first m of the micro-batch's n examples (m when unknown): the count G is averaged
        over, so that A ⊗ G is the Fisher of the loss *per term* whatever the sequence length."""
        t = self._terms_for(n)
        return float(m) if t is None else t[:m].sum()

    def example_scale(self, n: int) -> float | Tensor:
        """Factor s with per-term gradient ĝ = s · (gradient seen by the hook) for a micro-batch of n examples.

        Training backward: a loss averaged over its M terms (M = n examples, or the tokens that carry a label) is
        undone by ×M (1 for a summed loss), DeepSpeed's division by gradient_accumulation_steps by ×steps, the
        loss scale by ÷scale. The sampled-label backward uses a summed loss computed by the optimizer: s = 1.
        A 0-d device tensor when M was counted from the data (no host sync), else a float.
        """
        if self.phase == "mc":
            return 1.0
        rest = self.grad_accum_steps / float(self.loss_scale())
        if self.loss_reduction != "mean":
            return rest
        t = self._terms_for(n)
        return float(n) * rest if t is None else t.sum() * rest


Capture = Callable[[Tensor, int], Callable[[Tensor, "float | Tensor"], None]]


class FisherBlock(ABC):
    """One preconditioned module: its factors, hooks, preconditioner and the parameters it owns.

    Args:
        name: the module's qualified name in the model.
        module: the module (hooks are registered on it).
        ctx: the shared capture context.

    Attributes:
        params: the module's parameters in gradient order (e.g. [weight, bias]).
        factors: the statistics this block reduces and inverts.
        fired: True once the hooks have captured a full forward+backward.
    """

    kind: str = "block"

    @staticmethod
    @abstractmethod
    def unsupported_reason(module: nn.Module) -> str | None:
        """None when this block kind can precondition ``module``, else why not (shown in the fallback report)."""

    def __init__(self, name: str, module: nn.Module, ctx: CaptureContext) -> None:
        """Raises: ValueError naming the module when this block kind does not support it."""
        reason = self.unsupported_reason(module)
        if reason is not None:
            raise ValueError(f"{name}: {reason}")
        self.name = name
        self.module = module
        self.ctx = ctx
        self.params: list[nn.Parameter] = [p for p in (getattr(module, "weight", None), getattr(module, "bias", None))
                                           if p is not None]
        self.fired = False
        self.precond_ready = False
        self._inert = False  # a deep copy (e.g. of a model carrying these hooks) never collects
        self._handles: list[RemovableHandle] = []
        self._inverse: tuple[Tensor, ...] | None = None
        self._method = "inverse"
        # momentum u of the polar direction (ds_spngd.polar), d_out × d_A fp32, on the ranks preconditioning the block
        self.direction_momentum: Tensor | None = None

    @property
    @abstractmethod
    def factors(self) -> list[SymmetricFactor]:
        """The block's factors in a fixed order (identical on every rank)."""

    @property
    def device(self) -> torch.device:
        """The device of the block's parameters, read now (DeepSpeed moves the model after the blocks were built)."""
        return self.params[0].device

    def _param_device(self) -> torch.device:
        """:attr:`device` as a callable, for the block's factors (they read it at use time)."""
        return self.device

    def hooked(self) -> list[tuple[nn.Module, Capture]]:
        """(module, capture) pairs whose forward hooks feed this block: one per module it reads (a block over a
        shared parameter reads several). capture(x, m) records forward statistics of the first m examples of the
        module input x and returns the callback that receives their output gradient and the per-term scale."""
        return [(self.module, self._capture_forward)]

    def register(self) -> None:
        """Install the forward hooks on the module(s)."""
        if not self._handles:
            self._handles = [mod.register_forward_hook(self._hook_for(capture)) for mod, capture in self.hooked()]

    def remove(self) -> None:
        """Remove the hooks (the block stops collecting)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __deepcopy__(self, memo: dict[int, object]) -> FisherBlock:
        """Copies come along when a model carrying this block's hooks is deep-copied; they are inert (their hooks do
        nothing), since no optimizer steps them: build a new optimizer on the copy."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            setattr(new, k, copy.deepcopy(v, memo))
        new._inert = True
        return new

    def _hook_for(self, capture: Capture) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def forward_hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if self._inert or not (self.ctx.collecting and module.training and torch.is_grad_enabled()):
                return
            if not inputs or not isinstance(output, Tensor) or not output.requires_grad:
                return
            if not any(f.due for f in self.factors):  # every factor's refresh is skipped (stale_statistics)
                return
            t0 = time.perf_counter()
            x = inputs[0].detach()
            n = int(x.shape[0])
            m = self.ctx.sample_size(n)
            on_grad = capture(x, m)
            self.ctx.factor_seconds += time.perf_counter() - t0
            out_id = id(output)

            def hook(grad: Tensor) -> None:
                if self.ctx.accepts_grad():
                    t1 = time.perf_counter()
                    if self.ctx.output_id == out_id:  # this layer's output is the model's: count its loss terms
                        self.ctx.count_terms(grad)
                    on_grad(grad.detach()[:m], self.ctx.example_scale(n))
                    self.fired = True
                    self.ctx.factor_seconds += time.perf_counter() - t1

            output.register_hook(hook)
            if self.ctx.track_output is not None:
                self.ctx.track_output(output)

        return forward_hook

    @abstractmethod
    def _capture_forward(self, x: Tensor, m: int) -> Callable[[Tensor, float | Tensor], None]:
        """Record forward statistics of the first m examples of input x (N × …).

        Returns the callback that records G from ∂L/∂output of those m examples (shape m × …) and the per-term
        scale s (:meth:`CaptureContext.example_scale`). x is the whole micro-batch so that batch statistics
        (BatchNorm's x̂) are those of the forward pass.
        """

    @abstractmethod
    def draft_preconditioner(self, damping: float, method: str) -> PreconditionerDraft:
        """Owner side: start computing the damped inverse/eigendecomposition from the committed factors, with no host
        sync (the factors were checked finite by every rank together).

        Raises:
            RuntimeError: the factors have no value on this rank (only their owner may draft).
            ValueError: unknown ``method``.
            torch.linalg.LinAlgError: an eigendecomposition did not converge (fp32 nor fp64).
        """

    @abstractmethod
    def preconditioner_shapes(self, method: str) -> list[tuple[int, ...]]:
        """Shapes of the tensors a draft builds for ``method`` (what an owner sends)."""

    # ---- parts: the units of ownership (a block is one part unless a side is chunked, see curvature/side.py) ------
    def parts(self) -> list[list[SymmetricFactor]]:
        """The block's factors grouped into the units that are reduced to, and drafted by, one owner rank each (a
        partition of :attr:`factors`; identical on every rank). Default: the whole block is one part."""
        return [self.factors]

    def draft_part(self, k: int, damping: float, method: str, traces: Traces) -> PreconditionerDraft:
        """Owner of part ``k``: its share of the preconditioner. ``traces`` holds every factor's trace (all-reduced
        when the parts have different owners). Default (one part): :meth:`draft_preconditioner`.

        Raises:
            as :meth:`draft_preconditioner`.
        """
        return self.draft_preconditioner(damping, method)

    def part_shapes(self, k: int, method: str) -> list[tuple[int, ...]]:
        """Shapes of the tensors part ``k``'s draft builds (what its owner sends)."""
        return self.preconditioner_shapes(method)

    def install_parts(self, tensors: list[list[Tensor]], method: str, damping: float) -> None:
        """Install the preconditioner from every part's tensors (in :meth:`parts` order)."""
        self.install_preconditioner(tensors[0], method)

    def preconditioner_tensors(self) -> list[Tensor]:
        """The current preconditioner's tensors (fp32), in :meth:`preconditioner_shapes` order.

        Raises:
            RuntimeError: when this rank holds none.
        """
        if self._inverse is None:
            raise RuntimeError(f"{self.name}: no preconditioner yet")
        return list(self._inverse)

    def install_preconditioner(self, tensors: list[Tensor], method: str) -> None:
        """Install a preconditioner (drafted by the block's owner rank, agreed by every rank).

        Raises:
            ValueError: when the shapes differ from :meth:`preconditioner_shapes`.
        """
        shapes = [tuple(t.shape) for t in tensors]
        if shapes != self.preconditioner_shapes(method):
            raise ValueError(f"{self.name}: preconditioner shapes {shapes} != {self.preconditioner_shapes(method)}")
        self._inverse = tuple(tensors)
        self._method = method
        self.precond_ready = True

    @property
    def preconditioner_bytes(self) -> int:
        """Bytes of the preconditioner tensors this rank holds."""
        return 0 if self._inverse is None else sum(t.numel() * t.element_size() for t in self._inverse)

    @abstractmethod
    def precondition(self, grads: list[Tensor]) -> list[Tensor]:
        """Return the natural-gradient direction F̂⁻¹ g for this block's parameter gradients (same shapes, fp32)."""

    @property
    def has_factors(self) -> bool:
        """True once every factor has a committed global estimate (identical on every rank; the values themselves
        live on the block's owner)."""
        return all(f.committed for f in self.factors)

    @property
    def has_preconditioner(self) -> bool:
        """True once the block's preconditioner exists somewhere (identical on every rank: with
        ``precondition_mode="mem_opt"`` only the owner holds it, see :attr:`holds_preconditioner`)."""
        return self.precond_ready

    @property
    def holds_preconditioner(self) -> bool:
        """True when this rank holds the preconditioner's tensors."""
        return self._inverse is not None

    def mark_ready(self) -> None:
        """Record that the block's preconditioner now exists on its owner (every rank calls this after an agreed
        inversion, including ranks that hold no copy; see :attr:`has_preconditioner`)."""
        self.precond_ready = True

    def drop_preconditioner(self) -> None:
        """Free this rank's copy of the preconditioner (the block stays ready: its owner holds one)."""
        self._inverse = None

    def state_dict(self) -> dict[str, object]:
        """Committed factors and the preconditioner in use (between inversions it is older than the factors, so a
        resumed run must not rebuild it from them)."""
        state: dict[str, object] = {f.name: f.state_dict() for f in self.factors}
        state["preconditioner"] = None if self._inverse is None else [t.clone() for t in self._inverse]
        state["method"] = self._method
        state["ready"] = self.precond_ready
        if self.direction_momentum is not None:
            state["direction_momentum"] = self.direction_momentum.clone()
        return state

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore factors and preconditioner saved by :meth:`state_dict`, moved to the block's device.

        Raises:
            KeyError: a factor is missing from the checkpoint.
        """
        for f in self.factors:
            if f.name not in state:
                raise KeyError(f"checkpoint has no factor {f.name}")
            f.load_state_dict(state[f.name])  # type: ignore[arg-type]
        inv = state.get("preconditioner")
        if inv is not None and not (isinstance(inv, (list, tuple)) and all(isinstance(t, Tensor) for t in inv)):
            raise ValueError(f"{self.name}: checkpoint preconditioner must be a list of tensors")
        dev = self.device
        self._inverse = None if inv is None else tuple(t.to(device=dev, dtype=torch.float32).contiguous().clone()
                                                       for t in inv)
        if state.get("method") is not None:
            self._method = str(state["method"])
        self.precond_ready = bool(state.get("ready", inv is not None))
        mom = state.get("direction_momentum")
        if mom is not None and not isinstance(mom, Tensor):
            raise ValueError(f"{self.name}: checkpoint direction_momentum must be a tensor")
        self.direction_momentum = None if mom is None else mom.to(device=dev, dtype=torch.float32).clone()

    @abstractmethod
    def describe(self) -> str:
        """One line for the start-up report: kind and factor sizes."""
