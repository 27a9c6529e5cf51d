"""Adversarial training inside the lab's loop: plain (sequential) and concurrent (ConAdv) adversarial learning.

ConAdv is Liu, Chen, Cheng, Hsieh & You, "Concurrent Adversarial Learning for Large-Batch Training" (ICLR 2022,
arXiv:2106.00221). Adversarial training minimises a loss on clean and on perturbed examples; the perturbation needs
∇_x L(w; x), a forward+backward that must finish before the step's own forward+backward on the perturbed batch, so
plain adversarial training puts two gradient computations in series at every step. ConAdv breaks the chain with
stale ("staled") parameters: the perturbation of batch t is taken at the weights of an earlier step t − τ, so it can
be computed concurrently with that step's own gradients. The paper scales ResNet-50 on ImageNet to batch 96K at 75.3%
top-1 this way (76.2% with data augmentation). τ = 1 here.

What is built here, per micro-batch ``x`` (N examples) with targets ``y``:

* perturbation (FGSM, Goodfellow et al. 2015; PGD with k steps, Madry et al. 2018): δ₀ = 0,
  δ_{j+1} = clip(δ_j + α · sign ∇_δ L(w'; x + δ_j, y), −ε, ε); with ``steps = 1`` and α = ε this is FGSM,
  δ = ε · sign ∇_x L(w'; x, y). L∞ ball, in the units of the model input (train.py: normalised pixels), no clamp to
  the pixel range. ``w'`` is the current weights w_t (``mode="plain"``) or the previous step's, w_{t−1}
  (``mode="conadv"``, τ = 1; at step 0, where there is none, w_0). The gradient pass runs on a hook-free copy of the
  model (:func:`hook_free_copy`) through ``torch.func.functional_call`` with detached weights: SP-NGD's hooks and
  DeepSpeed never see it, it produces no weight gradient, and its BatchNorm statistics go to the copy's buffers.
* text (train_lm.py): token ids cannot be perturbed, so with ``site`` naming a module (the token embedding) δ is
  added to that module's output (N × T × d), through a forward hook.
* loss: one forward+backward **through the DeepSpeed engine** on the 2N examples ``x_0, x_0+δ_0, x_1, x_1+δ_1, …``
  (clean and perturbed interleaved), L = c · L(w_t; x, y) + (1 − c) · L(w_t; x + δ, y) with c = ``clean_weight``
  (0.5: the mean over all 2N examples). Everything downstream sees one ordinary micro-batch: DeepSpeed's gradient
  accumulation and all-reduce, and SP-NGD's factors, which therefore hold both clean and adversarial examples
  (the curvature of the objective actually minimised; interleaving keeps them in equal share when
  ``factor_sample_fraction`` < 1 takes only the first examples). With c = 0.5 SP-NGD's per-example gradients are
  exact; with another c, clean rows are scaled by 2c and adversarial rows by 2(1 − c) in G. BatchNorm normalises
  clean and adversarial examples together (one batch); activation memory of the engine pass doubles.

Paper vs our choices: adversarial examples from stale weights, generated concurrently with the step, are the paper's
(its abstract; the algorithm section with its τ, ε, attack steps and loss weights could not be retrieved here). τ = 1,
ε and the FGSM/PGD form, training on clean plus adversarial examples with weight c = 0.5, the interleaved single
engine pass, the joint BatchNorm and the factors' share are ours.

Concurrency (``mode="conadv"``, :meth:`AdversarialStep.lookahead`): the loop takes micro-batches one ahead, and the
perturbation of the next micro-batch is started before the current one's engine pass, at the weights it needs (the
live w_t when it opens the next optimizer step, the snapshot w_{t−1} when it belongs to this one). On CUDA with
``overlap`` it runs on a side stream, concurrently with the engine pass; the optimizer update waits for it
(:meth:`AdversarialStep.before_update`), since it reads the weights the update overwrites. On a CPU everything runs
in series: conadv then costs what plain costs (one extra forward+backward of N examples), the values are the same.

Config (a top-level section of the DeepSpeed JSON; DeepSpeed 0.19.8 accepts and ignores unknown top-level keys)::

    "adversarial": {"enabled": true, "mode": "conadv", "epsilon": 0.1, "steps": 1, "step_size": null,
                    "clean_weight": 0.5, "site": null, "overlap": true}

Not supported: ZeRO stage 3 (parameters are partitioned; the copy would hold empty tensors).
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["SECTION", "AdversarialConfig", "AdversarialConfigError", "AdversarialStep", "AdversarialTask",
           "hook_free_copy", "interleave", "parse_adversarial", "sign_attack"]  # fmt: skip

SECTION = "adversarial"
Batch = tuple[Tensor, Tensor]
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")  # fmt: skip


class AdversarialConfigError(ValueError):
    """An invalid ``adversarial`` section; the message names every offending key (``adversarial.<key>``)."""


class AdversarialConfig(BaseModel):
    """The ``adversarial`` section.

    Attributes:
        enabled: train on clean + adversarial examples.
        mode: ``"conadv"`` (perturbation at the previous step's weights, τ = 1) or ``"plain"`` (current weights).
        epsilon: L∞ radius ε of the perturbation, in model-input units (>= 0; required when enabled).
        steps: sign-gradient steps (1: FGSM; k > 1: PGD from δ = 0).
        step_size: α per step (> 0); default ε for one step, 2.5 ε / steps for PGD (Madry et al. 2018).
        clean_weight: c in L = c · L_clean + (1 − c) · L_adv, in [0, 1].
        site: None: perturb the model input; a module name (e.g. ``"tok_embed"``): perturb that module's output.
        overlap: conadv on CUDA: compute the next perturbation on a side stream during the engine pass.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: StrictBool = False
    mode: Literal["conadv", "plain"] = "conadv"
    epsilon: float | None = Field(None, ge=0.0)
    steps: int = Field(1, ge=1)
    step_size: float | None = Field(None, gt=0.0)
    clean_weight: float = Field(0.5, ge=0.0, le=1.0)
    site: str | None = Field(None, min_length=1)
    overlap: StrictBool = True

    @field_validator("epsilon", "steps", "step_size", "clean_weight", mode="before")
    @classmethod
    def _no_bool(cls, v: Any) -> Any:
        # pydantic's lax mode reads JSON true/false as 1/0; a boolean where a number belongs is a config mistake
        if isinstance(v, bool):
            raise ValueError("expected a number, got a boolean")
        return v

    @property
    def alpha(self) -> float:
        """The step size α actually used (``step_size``, or its default)."""
        if self.step_size is not None:
            return self.step_size
        eps = self.epsilon or 0.0
        return eps if self.steps == 1 else 2.5 * eps / self.steps

    def describe(self) -> str:
        """One line for a settings table, e.g. ``"conadv eps=0.1 steps=1 alpha=0.1 clean_weight=0.5"``."""
        if not self.enabled:
            return "off"
        site = f" site={self.site}" if self.site else ""
        return (f"{self.mode} eps={self.epsilon:g} steps={self.steps} alpha={self.alpha:g} "
                f"clean_weight={self.clean_weight:g}{site}")


def parse_adversarial(ds_config: dict[str, Any]) -> AdversarialConfig:
    """Validate the ``adversarial`` section of a DeepSpeed config (absent: disabled).

    Raises:
        AdversarialConfigError: naming every offending key (``adversarial.<key>``), or a ZeRO stage 3 config.
    """
    section = ds_config.get(SECTION)
    if section is None:
        return AdversarialConfig.model_validate({})
    if not isinstance(section, dict):
        raise AdversarialConfigError(f"{SECTION} must be an object, got {type(section).__name__}")
    try:
        cfg = AdversarialConfig.model_validate(section)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "<section>"
            lines.append(f"  {SECTION}.{key}: {e['msg']} (got {e.get('input')!r})")
        raise AdversarialConfigError(f"invalid {SECTION} config:\n" + "\n".join(lines)) from None
    if cfg.enabled and cfg.epsilon is None:
        raise AdversarialConfigError(f"invalid {SECTION} config:\n  {SECTION}.epsilon: required when enabled (in the "
                                     "model input's units)")
    zero = ds_config.get("zero_optimization") or {}
    if cfg.enabled and isinstance(zero, dict) and int(zero.get("stage", 0)) >= 3:
        raise AdversarialConfigError(f"{SECTION}.enabled: not supported with zero_optimization.stage 3 "
                                     "(the perturbation pass needs whole parameters)")
    return cfg


# ---- building blocks ---------------------------------------------------------------------------------------------
def hook_free_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` without any module hook (SP-NGD's statistics hooks, timing hooks) and with
    ``requires_grad=False`` parameters; the original's hooks are set aside during the copy and put back."""
    saved: list[tuple[nn.Module, str, Any]] = []
    try:
        for m in module.modules():
            for name in _HOOK_DICTS:
                if hasattr(m, name):
                    saved.append((m, name, getattr(m, name)))
                    setattr(m, name, OrderedDict())
        clone = copy.deepcopy(module)
    finally:
        for m, name, hooks in saved:
            setattr(m, name, hooks)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def interleave(a: Tensor, b: Tensor) -> Tensor:
    """Rows ``a_0, b_0, a_1, b_1, …``: (2N, …) from two (N, …) tensors of one shape (``[0::2]`` gives ``a``)."""
    if a.shape != b.shape:
        raise ValueError(f"interleave needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.stack((a, b), dim=1).reshape(2 * a.shape[0], *a.shape[1:])


def sign_attack(loss_at: Callable[[Tensor | None], tuple[Tensor, Tensor]], epsilon: float, steps: int,
                alpha: float) -> Tensor:
    """L∞ sign-gradient ascent from δ = 0 (PGD; FGSM for one step with α = ε).

    Args:
        loss_at: ``δ or None (zero) -> (loss, leaf)``: the scalar loss at the perturbation ``leaf``, a tensor with
            ``requires_grad`` holding δ (or zeros of the perturbed tensor's shape).
        epsilon: radius ε (>= 0). steps: k >= 1. alpha: step size α > 0.

    Returns:
        δ (detached, the perturbed tensor's shape and dtype): clip(δ + α · sign ∇_δ L, −ε, ε), k times.
    """
    delta: Tensor | None = None
    for _ in range(steps):
        loss, leaf = loss_at(delta)
        (grad,) = torch.autograd.grad(loss, leaf)
        delta = (leaf.detach() + alpha * grad.sign()).clamp_(-epsilon, epsilon)
    assert delta is not None  # steps >= 1
    return delta


@contextlib.contextmanager
def _add_to_output(module: nn.Module, make: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """While open, ``module``'s output ``o`` becomes ``o + make(o)`` (a forward hook, registered last)."""
    handle = module.register_forward_hook(lambda _m, _i, out: out + make(out))
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class AdversarialTask:
    """What the script contributes: how a raw micro-batch becomes model input and how the loss is taken.

    Attributes:
        prepare: raw inputs (CPU) -> model inputs on the engine's device and dtype (N × … images, N × T token ids).
        criterion: ``(logits, raw targets) -> mean loss`` (a 0-d tensor) for N examples.
        logits: model output -> logits tensor with the examples on dim 0 (identity; ``lm_logits`` for GPT).
    """

    prepare: Callable[[Tensor], Tensor]
    criterion: Callable[[Tensor, Tensor], Tensor]
    logits: Callable[[Any], Tensor] = lambda out: out


@dataclass
class _Pending:
    """A perturbation started ahead (:meth:`AdversarialStep.lookahead`) for the micro-batch whose raw inputs are
    ``raw``: its prepared ``inputs``, ``delta`` and, on a side stream, the ``event`` that marks it done."""

    raw: Tensor
    inputs: Tensor
    delta: Tensor
    event: Any = None


class AdversarialStep:
    """The adversarial micro-batch loss of one run: perturbation (plain or ConAdv) and the engine pass on clean +
    adversarial examples (see the module docstring).

    Args:
        cfg: the validated, enabled section.
        engine: the DeepSpeed engine (``engine.module`` is the model, ``engine(inputs)`` its forward).
        task: the script's input preparation and loss.

    Attributes:
        last_losses: the last micro-batch's ``(clean, adversarial)`` losses (detached 0-d tensors, no host sync).

    Raises:
        AdversarialConfigError: ``site`` names no module of the model.
        ValueError: the section is not enabled, or the parameters are partitioned (ZeRO stage 3).
    """

    def __init__(self, cfg: AdversarialConfig, engine: Any, task: AdversarialTask) -> None:
        if not cfg.enabled or cfg.epsilon is None:
            raise ValueError("AdversarialStep needs an enabled adversarial section with an epsilon")
        model: nn.Module = engine.module
        if any(getattr(p, "ds_shape", None) is not None for p in model.parameters()):
            raise ValueError("adversarial training needs whole parameters (ZeRO stage 3 partitions them)")
        self.cfg, self.engine, self.task, self.model = cfg, engine, task, model
        self.shadow = hook_free_copy(model)
        self._live = dict(model.named_parameters())
        self._stale = {n: p.detach().clone() for n, p in self._live.items()} if cfg.mode == "conadv" else {}
        self._site_live: nn.Module | None = None
        self._site_shadow: nn.Module | None = None
        if cfg.site is not None:
            try:
                self._site_live, self._site_shadow = model.get_submodule(cfg.site), self.shadow.get_submodule(cfg.site)
            except AttributeError as err:
                raise AdversarialConfigError(f"{SECTION}.site: no module {cfg.site!r} in the model ({err})") from None
        device = next(model.parameters()).device
        use_stream = cfg.mode == "conadv" and cfg.overlap and device.type == "cuda"
        self._stream: Any = torch.cuda.Stream(device=device) if use_stream else None
        self._pending: list[_Pending] = []
        self.last_losses: tuple[Tensor, Tensor] | None = None

    # ---- the loop's three calls ------------------------------------------------------------------------------------
    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The micro-batch's loss c · L(w_t; x) + (1 − c) · L(w_t; x + δ) from one engine forward on the 2N
        interleaved examples (call ``engine.backward`` on it as on any loss); δ is the one :meth:`lookahead` started
        for ``x``, else computed now (plain: at w_t; conadv: at the snapshot w_{t−1})."""
        pending = self._take(x)
        if pending is None:
            inputs = self.task.prepare(x)
            delta = self.perturbation(inputs, y, self._params(stale=self.cfg.mode == "conadv"))
        else:
            inputs, delta = pending.inputs, pending.delta
        return self._engine_loss(inputs, delta, y)

    def lookahead(self, batches: Iterator[Batch], micro_batches: int) -> Iterator[Batch]:
        """``batches`` (one epoch's micro-batches, starting at an optimizer step) unchanged; in conadv mode each
        micro-batch's perturbation is started before the previous one is handed out, i.e. before the previous engine
        pass (concurrently with it on a CUDA side stream), at w_{t−1} of its own step t: the snapshot when it shares
        the step of the micro-batch handed out now, the live weights when it opens the next step
        (``micro_batches``: gradient_accumulation_steps). Plain mode: ``batches`` as they are."""
        if self.cfg.mode != "conadv":
            yield from batches
            return
        self._pending.clear()
        cur = next(batches, None)
        if cur is not None:
            self._launch(cur, stale=True)  # the first micro-batch opens a step: its w_{t-1} is the snapshot
        index = 0
        while cur is not None:
            nxt = next(batches, None)
            if nxt is not None:
                self._launch(nxt, stale=(index + 1) % micro_batches != 0)
            yield cur
            cur, index = nxt, index + 1

    def before_update(self) -> None:
        """Right before the optimizer step that turns w_t into w_{t+1}: wait for perturbations still reading w_t
        (side stream), then, in conadv mode, keep w_t as the next step's snapshot."""
        if self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
        with torch.no_grad():
            for name, stale in self._stale.items():
                stale.copy_(self._live[name])

    # ---- the pieces ------------------------------------------------------------------------------------------------
    def perturbation(self, inputs: Tensor, y: Tensor, params: dict[str, Tensor]) -> Tensor:
        """δ of :func:`sign_attack` for prepared ``inputs`` (N × …) and targets ``y`` at the weights ``params``
        (name -> detached tensor), on the hook-free copy in the model's train/eval mode. Shape: ``inputs``' (input
        site) or the site module's output's (N × T × d for a token embedding).

        Raises:
            AdversarialConfigError: integer inputs (token ids) without ``site``, or a site that runs more than once
                per forward.
        """
        self.shadow.train(self.model.training)
        site = self._site_shadow
        if site is None and not inputs.is_floating_point():
            raise AdversarialConfigError(f"{SECTION}.site: the model input is {inputs.dtype} (token ids?); name the "
                                         "module whose output to perturb, e.g. the token embedding")

        def loss_at(delta: Tensor | None) -> tuple[Tensor, Tensor]:
            leaves: list[Tensor] = []

            def leaf_like(t: Tensor) -> Tensor:
                leaves.append((torch.zeros_like(t) if delta is None else delta.detach()).requires_grad_(True))
                return leaves[-1]

            if site is None:
                out = functional_call(self.shadow, params, (inputs + leaf_like(inputs),))
            else:
                with _add_to_output(site, leaf_like):
                    out = functional_call(self.shadow, params, (inputs,))
                if len(leaves) != 1:
                    raise AdversarialConfigError(f"{SECTION}.site: {self.cfg.site!r} ran {len(leaves)} times in one "
                                                 "forward; name a module that runs once")
            return self.task.criterion(self.task.logits(out), y), leaves[0]

        with torch.enable_grad():
            return sign_attack(loss_at, float(self.cfg.epsilon or 0.0), self.cfg.steps, self.cfg.alpha)

    def _params(self, stale: bool) -> dict[str, Tensor]:
        """The snapshot w_{t−1} (conadv) or the live weights w_t, detached, by parameter name."""
        return self._stale if stale and self._stale else {n: p.detach() for n, p in self._live.items()}

    def _engine_loss(self, inputs: Tensor, delta: Tensor, y: Tensor) -> Tensor:
        """One engine forward on ``x_0, x_0+δ_0, x_1, …`` (2N examples); returns c · L_clean + (1 − c) · L_adv."""
        if self._site_live is None:
            out = self.engine(interleave(inputs, inputs + delta))
        else:
            shift = interleave(torch.zeros_like(delta), delta)
            with _add_to_output(self._site_live, lambda _o: shift):
                out = self.engine(interleave(inputs, inputs))
        z = self.task.logits(out)
        clean, adv = self.task.criterion(z[0::2], y), self.task.criterion(z[1::2], y)
        self.last_losses = (clean.detach(), adv.detach())
        c = self.cfg.clean_weight
        return c * clean + (1.0 - c) * adv

    def _launch(self, batch: Batch, stale: bool) -> None:
        """Start the perturbation of the raw micro-batch ``batch = (x, y)`` at the snapshot (``stale``) or the live
        weights: on the side stream when there is one (after the work queued so far on the current stream)."""
        x, y = batch
        inputs = self.task.prepare(x)
        params = self._params(stale)
        if self._stream is None:
            self._pending.append(_Pending(x, inputs, self.perturbation(inputs, y, params)))
            return
        self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
        with torch.cuda.stream(self._stream):
            delta = self.perturbation(inputs, y, params)
            event = torch.cuda.Event()
            event.record(self._stream)
        inputs.record_stream(self._stream)  # allocated on the current stream, read on the side stream
        self._pending.append(_Pending(x, inputs, delta, event))

    def _take(self, x: Tensor) -> _Pending | None:
        """The perturbation started for raw inputs ``x`` (identity), made ready for the current stream; None when
        none was started (then it is computed in :meth:`loss`)."""
        for i, pending in enumerate(self._pending):
            if pending.raw is x:
                del self._pending[: i + 1]  # earlier ones were never asked for
                if pending.event is not None:
                    current = torch.cuda.current_stream(pending.delta.device)
                    current.wait_event(pending.event)
                    pending.delta.record_stream(current)  # allocated on the side stream, read on this one
                return pending
        return None
