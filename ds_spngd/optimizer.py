"""SP-NGD: the natural-gradient optimizer (K-FAC preconditioning + SP-NGD's update rule).

Per optimizer step t (Osawa et al. CVPR 2019, arXiv:1811.12019 §3–4; TPAMI 2020, arXiv:2002.06015):

1. on factor-refresh steps (t mod factor_update_steps = 0) the factors captured by the module hooks during this
   step's forward/backward passes are reduced over data-parallel ranks and folded into their running averages;
2. on inversion steps (t mod inv_update_steps = 0) every block's damped inverse/eigendecomposition is recomputed by
   one owner rank (LPT on d³, :mod:`ds_spngd.comm.assignment`) and broadcast to the others;
3. each preconditioned block's gradient g becomes ĝ = F̂⁻¹ g; parameters without a block keep g;
4. optional KL-clipping (Ba et al. ICLR 2017): ĝ ← ν·ĝ, ν = min(1, sqrt(κ / (η² Σ_l ĝ_l·g_l)));
5. heavy-ball momentum with the weight decay added after preconditioning (as torch.optim.SGD adds it):
   d = ĝ + wd·w. With ``momentum_correction`` (Goyal et al. 2017, arXiv:1706.02677 §2.1) the velocity is
   v_t = η_t·u_t with u ← m·u + d (torch.optim.SGD's buffer), i.e. v ← m·(η_t/η_{t−1})·v + η_t·d, well defined
   when η_{t−1} = 0; without it v ← m·v + η_t·d. In both cases w ← w − v;
6. optional weight rescaling (SP-NGD): each preconditioned Linear/Conv2d weight with ‖W‖_F > sqrt(2·d_out) is
   rescaled to that norm.

Gradients are read from ``p.grad`` of the parameters in ``param_groups`` *by position*: DeepSpeed's bf16 wrapper
replaces the parameter objects by fp32 clones in the same positions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ds_spngd.comm.assignment import Assignment
from ds_spngd.comm.collectives import rank, reduce_factors, world_size
from ds_spngd.comm.inversion import distributed_update, plan_owners
from ds_spngd.config import SPNGDConfig, parse_spngd_params
from ds_spngd.curvature.base import CaptureContext, FisherBlock
from ds_spngd.curvature.registry import build_blocks

__all__ = ["SPNGD"]

logger = logging.getLogger("ds_spngd")


class SPNGD(torch.optim.Optimizer):
    """Scalable and Practical Natural Gradient Descent (distributed K-FAC) for DeepSpeed.

    Args:
        params: the model's parameters or parameter groups (groups may override lr, momentum, weight_decay).
        model: the raw (unwrapped) model whose Linear/Conv2d/BatchNorm/LayerNorm modules get Fisher blocks. Build the
            optimizer *before* ``deepspeed.initialize`` (``ds_spngd.initialize`` does this).
        config: an :class:`SPNGDConfig` or the JSON ``optimizer.params`` dict; keyword overrides win.
        process_group: data-parallel group for factor reduction (None = world).

    Raises:
        SPNGDConfigError: on an invalid config (names the key).
    """

    def __init__(
        self,
        params: Iterable[Any],
        model: nn.Module,
        config: SPNGDConfig | dict[str, Any] | None = None,
        process_group: Any = None,
        **overrides: Any,
    ) -> None:
        if isinstance(config, SPNGDConfig):
            cfg = config.model_copy(update=overrides) if overrides else config
            if overrides:
                cfg = parse_spngd_params(cfg.model_dump())
        else:
            cfg = parse_spngd_params({**(config or {}), **overrides})
        self.cfg = cfg
        super().__init__(params, {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay})
        self.process_group = process_group
        self.ctx = CaptureContext(fisher_type=cfg.fisher_type, loss_reduction=cfg.loss_reduction,
                                  sample_fraction=cfg.factor_sample_fraction)
        positions = {id(p): (gi, pi) for gi, g in enumerate(self.param_groups) for pi, p in enumerate(g["params"])}
        plan = build_blocks(model, self.ctx, set(positions), cfg.skip_modules)
        self.blocks: list[FisherBlock] = plan.blocks
        self.fallback: list[tuple[str, str]] = plan.fallback
        self._positions = [[positions[id(p)] for p in b.params] for b in self.blocks]
        for b in self.blocks:
            b.register()
        self._mc_outputs: list[Tensor] = []
        self._mc_handle = None
        if cfg.fisher_type == "mc":
            self.ctx.track_output = self._mc_outputs.append
            self._mc_handle = model.register_forward_hook(self._mc_hook)
        self._owners: Assignment | None = None  # inversion owners, planned at the first inversion
        self.steps = 0
        self.suspended = False
        self._reported_silent = False
        self.last_stats: dict[str, float] = {}
        logger.debug("%s", self.report())

    # ---- reporting --------------------------------------------------------------------------------------------
    def report(self) -> str:
        """Human-readable list of the preconditioned modules and of those left to the base update."""
        lines = [f"SP-NGD preconditions {len(self.blocks)} module(s):"]
        lines += [f"  {b.describe()}" for b in self.blocks]
        if self.fallback:
            lines.append(f"plain momentum-SGD update for {len(self.fallback)} module(s):")
            lines += [f"  {n}: {r}" for n, r in self.fallback]
        return "\n".join(lines)

    # ---- Monte-Carlo Fisher -----------------------------------------------------------------------------------
    def _mc_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        """Sampled-label backward for fisher_type="mc" (Martens & Grosse 2015 §5): y ~ softmax(logits), one sample.

        Runs on factor-refresh steps only, from the model's forward hook, back to the first hooked layer output only
        (no weight gradients); the training gradients are untouched.
        """
        outputs = list(self._mc_outputs)
        self._mc_outputs.clear()
        if not (self.ctx.collecting and module.training and torch.is_grad_enabled()) or not outputs:
            return
        if not isinstance(output, Tensor) or output.dim() != 2:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(f'fisher_type "mc" needs the model to return logits of shape N x classes, got {shape}')
        logits = output.float()
        with torch.no_grad():
            y = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1).squeeze(1)
        loss = F.cross_entropy(logits, y, reduction="sum")
        self.ctx.phase = "mc"
        try:
            torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True)
        finally:
            self.ctx.phase = "train"

    # ---- the step ---------------------------------------------------------------------------------------------
    def _grads_of(self, idx: int) -> list[Tensor] | None:
        grads = []
        for gi, pi in self._positions[idx]:
            g = self.param_groups[gi]["params"][pi].grad
            if g is None:
                return None
            grads.append(g)
        return grads

    def _refresh_curvature(self, refresh: bool, invert: bool) -> None:
        cfg = self.cfg
        if refresh:
            factors = [f for b in self.blocks for f in b.factors]
            reduce_factors(factors, cfg.factor_decay, self.process_group)
            if not self._reported_silent:
                self._reported_silent = True
                silent = [b for b in self.blocks if not b.has_factors]
                if silent and rank() == 0:
                    logger.warning(
                        "SP-NGD: hooks of %d module(s) never fired (%s); they use the plain momentum-SGD update "
                        "until they do", len(silent), ", ".join(b.name for b in silent))
        # also (re)builds blocks that have factors but no preconditioner (first use, hooks that fired late)
        todo = [b.has_factors and (invert or not b.has_preconditioner) for b in self.blocks]
        if any(todo):
            if self._owners is None:
                self._owners = plan_owners(self.blocks, self.process_group)
            distributed_update(self.blocks, todo, self._owners, cfg.damping, cfg.inverse_method, self.process_group)

    def _preconditioned(self) -> dict[tuple[int, int], Tensor]:
        """ĝ for every parameter of a block with a preconditioner, KL-clipped when configured."""
        out: dict[tuple[int, int], Tensor] = {}
        vg = 0.0
        for i, b in enumerate(self.blocks):
            if not b.has_preconditioner:
                continue
            grads = self._grads_of(i)
            if grads is None:
                continue
            nat = b.precondition(grads)
            if self.cfg.kl_clip is not None:
                vg += sum(float((v * g.float()).sum()) for v, g in zip(nat, grads, strict=True))
            out.update(zip(self._positions[i], nat, strict=True))
        if self.cfg.kl_clip is not None and out:
            lr = self.param_groups[0]["lr"]
            # lr = 0 (a warmup's first step) moves nothing: no clipping needed, and ν's formula would divide by 0
            nu = 1.0 if vg <= 0.0 or lr == 0.0 else min(1.0, math.sqrt(self.cfg.kl_clip / (lr * lr * vg)))
            self.last_stats["kl_clip_nu"] = nu
            if nu < 1.0:
                for v in out.values():
                    v.mul_(nu)
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one SP-NGD update (see the module docstring).

        Raises:
            FloatingPointError: naming the parameter whose gradient is NaN/Inf, or the block whose factor is; nothing
                is modified in that case.
        """
        if self.suspended:  # DeepSpeed's wrappers call step() once while being built, with zero gradients
            return None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_finite()
        cfg = self.cfg
        refresh = self.steps % cfg.factor_update_steps == 0
        invert = self.steps % cfg.inv_update_steps == 0
        self._refresh_curvature(refresh, invert)
        nat = self._preconditioned()
        for gi, group in enumerate(self.param_groups):
            self._update_group(gi, group, nat)
        if cfg.weight_rescale:
            self._rescale_weights()
        self.steps += 1
        self.ctx.collecting = self.steps % cfg.factor_update_steps == 0
        return loss

    def _check_finite(self) -> None:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        norms = torch._foreach_norm(grads)
        if bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
            return
        for b in self.blocks:  # this batch's statistics are as suspect as its gradients: drop them
            for f in b.factors:
                f.take_local()
        for gi, g in enumerate(self.param_groups):
            for pi, p in enumerate(g["params"]):
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    name = next((f"{b.name} ({b.kind})" for i, b in enumerate(self.blocks)
                                 if (gi, pi) in self._positions[i]), f"param_groups[{gi}][{pi}]")
                    raise FloatingPointError(
                        f"SP-NGD step {self.steps}: gradient of {name} (shape {tuple(p.shape)}) is NaN/Inf; "
                        "no parameter was updated")

    def _update_group(self, gi: int, group: dict[str, Any], nat: dict[tuple[int, int], Tensor]) -> None:
        lr, m, wd = float(group["lr"]), float(group["momentum"]), float(group["weight_decay"])
        for pi, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            d = nat.get((gi, pi))
            d = p.grad.float() if d is None else d
            if wd != 0.0:
                d = d.add(p.float(), alpha=wd)
            if m == 0.0:
                p.add_(d.to(p.dtype), alpha=-lr)
                continue
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if self.cfg.momentum_correction:  # u ← m·u + d; w ← w − η·u  (v = η·u: corrected heavy ball)
                if buf is None:
                    buf = state["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(m).add_(d)
                p.add_(buf.to(p.dtype), alpha=-lr)
            else:  # v ← m·v + η·d; w ← w − v
                if buf is None:
                    buf = state["momentum_buffer"] = d.mul(lr)
                else:
                    buf.mul_(m).add_(d, alpha=lr)
                p.sub_(buf.to(p.dtype))

    def _rescale_weights(self) -> None:
        for i, b in enumerate(self.blocks):
            if b.kind != "kronecker":
                continue
            gi, pi = self._positions[i][0]
            w = self.param_groups[gi]["params"][pi]
            bound = math.sqrt(2.0 * w.shape[0])
            norm = float(w.float().norm())
            if norm > bound:
                w.mul_(bound / norm)

    # ---- DeepSpeed glue hooks ---------------------------------------------------------------------------------
    def set_gradient_accumulation_steps(self, steps: int) -> None:
        """Tell the hooks that the engine divides the loss by ``steps`` (DeepSpeed's gradient_accumulation_steps)."""
        if steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {steps}")
        self.ctx.grad_accum_steps = int(steps)

    def set_loss_scale_fn(self, fn: Callable[[], float]) -> None:
        """Tell the hooks how to read the current loss scale (fp16); gradients seen by the hooks are divided by it."""
        self.ctx.loss_scale = fn

    # ---- state_dict contract (torch.optim) --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["spngd"] = {
            "steps": self.steps,
            "config": self.cfg.model_dump(),
            "world_size": world_size(self.process_group),
            "blocks": {b.name: b.state_dict() for b in self.blocks},
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's contract plus SP-NGD's blocks; the blocks are checked before anything is modified.

        Raises:
            ValueError: the checkpoint's Fisher blocks do not match this model's (names listed).
        """
        sd = dict(state_dict)
        extra = sd.pop("spngd", None)
        if extra is not None:
            saved = extra["blocks"]
            names = {b.name for b in self.blocks}
            if set(saved) != names:
                raise ValueError(
                    f"checkpoint Fisher blocks {sorted(saved)} do not match the model's {sorted(names)} "
                    f"(missing: {sorted(names - set(saved))}, unexpected: {sorted(set(saved) - names)})")
        super().load_state_dict(sd)
        if extra is None:
            return
        for b in self.blocks:
            b.load_state_dict(extra["blocks"][b.name])
        self.steps = int(extra["steps"])
        self.ctx.collecting = self.steps % self.cfg.factor_update_steps == 0

    def remove_hooks(self) -> None:
        """Detach every hook this optimizer installed (the model is left as it was)."""
        for b in self.blocks:
            b.remove()
        if self._mc_handle is not None:
            self._mc_handle.remove()
            self._mc_handle = None
