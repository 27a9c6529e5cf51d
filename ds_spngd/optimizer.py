"""SP-NGD: the natural-gradient optimizer (K-FAC preconditioning + SP-NGD's update rule).

Per optimizer step t (Osawa et al. CVPR 2019, arXiv:1811.12019 §3–4; TPAMI 2020, arXiv:2002.06015):

1. on factor-refresh steps (t mod factor_update_steps = 0) the factors captured by the module hooks during this
   step's forward/backward passes are reduced to their owner ranks — packed, bucketed and launched from the hooks
   as soon as they are final (:mod:`ds_spngd.comm.factor_reduction`) — and folded into their running averages;
2. on inversion steps (t mod inv_update_steps = 0) every block's damped inverse/eigendecomposition is recomputed by
   its owner rank (LPT on d³, :mod:`ds_spngd.comm.assignment`) and, with ``precondition_mode="comm_opt"``,
   broadcast to the others (:mod:`ds_spngd.comm.inversion`);
3. each preconditioned block's gradient g becomes ĝ = F̂⁻¹ g (by every rank, or by the owner and broadcast with
   ``"mem_opt"``); parameters without a block keep g;
4. optional KL-clipping (Ba et al. ICLR 2017): ĝ ← ν·ĝ, ν = min(1, sqrt(κ / (η² Σ_l ĝ_l·g_l)));
5. heavy-ball momentum with the weight decay added after preconditioning (as torch.optim.SGD adds it):
   d = ĝ + wd·w. With ``momentum_correction`` (Goyal et al. 2017, arXiv:1706.02677 §2.1) the velocity is
   v_t = η_t·u_t with u ← m·u + d (torch.optim.SGD's buffer), i.e. v ← m·(η_t/η_{t−1})·v + η_t·d, well defined
   when η_{t−1} = 0; without it v ← m·v + η_t·d. In both cases w ← w − v;
6. optional weight rescaling (SP-NGD): each preconditioned Linear/Conv2d weight with ‖W‖_F > sqrt(2·d_out) is
   rescaled to that norm.

Gradients are reached through :mod:`ds_spngd.gradients`: by position at ZeRO stage 0 (DeepSpeed's bf16 wrapper
replaces the parameter objects by fp32 clones in the same positions), through DeepSpeed's fragment maps at ZeRO 1/2.
``last_stats`` holds the step's timings (s) and bytes; see :meth:`SPNGD.step`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ds_spngd.comm.assignment import Assignment
from ds_spngd.comm.collectives import backend, rank, world_size
from ds_spngd.comm.factor_reduction import COMM_DTYPES, FactorReducer
from ds_spngd.comm.inversion import distributed_update, plan_owners, share_directions
from ds_spngd.config import SPNGDConfig, parse_spngd_params
from ds_spngd.curvature.base import CaptureContext, FisherBlock
from ds_spngd.curvature.registry import build_blocks
from ds_spngd.gradients import DenseGradients, PartitionedGradients, is_partitioned

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
        self._owners: Assignment | None = None  # inversion (and factor) owners
        self.reducer: FactorReducer | None = None
        self.grads: DenseGradients | PartitionedGradients = DenseGradients(self, self._positions, self.blocks)
        self.setup_distributed(process_group)
        self.steps = 0
        self.suspended = False
        self._reported_silent = False
        self.last_stats: dict[str, float] = {}
        self.engine_times: dict[str, float] = {}  # forward/backward seconds of the current step (set by attach)
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

    # ---- distributed set-up -----------------------------------------------------------------------------------
    def setup_distributed(self, group: Any = None) -> None:
        """Plan owners, factor buckets and the gradient access for the data-parallel ``group`` (None = world).

        Runs in the constructor and again from :func:`ds_spngd.initialize` once DeepSpeed built the engine (its
        data-parallel group, ZeRO partitions detected from DeepSpeed's fragment maps on the model's parameters).

        Raises:
            RuntimeError: after the first step (re-planning then would change the collective order mid-run).
        """
        if self.reducer is not None and (self.steps > 0 or self.reducer.in_flight):
            raise RuntimeError("setup_distributed() must run before the first optimizer step")
        self.process_group = group
        cfg = self.cfg
        self._owners = plan_owners(self.blocks, self.process_group)
        factors = [f for b in self.blocks for f in b.factors]
        owners = [self._owners.owners[i] for i, b in enumerate(self.blocks) for _ in b.factors]
        dtype_name = cfg.comm_dtype
        if dtype_name == "auto":
            dtype_name = "bf16" if backend(self.process_group) == "nccl" else "fp32"
        old = self.reducer
        self.reducer = FactorReducer(factors, owners, self.process_group, COMM_DTYPES[dtype_name],
                                     int(cfg.bucket_cap_mb * (1 << 20)), cfg.overlap_comm)
        if old is not None:
            self.reducer.adopt_counts(old)
        if is_partitioned([p for b in self.blocks for p in b.params]):
            self.grads = PartitionedGradients(self, self.blocks)

    # ---- the step ---------------------------------------------------------------------------------------------
    def _refresh_curvature(self, refresh: bool, invert: bool, stats: dict[str, float]) -> None:
        assert self.reducer is not None and self._owners is not None
        cfg = self.cfg
        if refresh:
            self.reducer.finish(cfg.factor_decay)
            rs = self.reducer.stats
            stats.update(comm_wait_s=rs["wait_s"], comm_launch_s=rs["launch_s"], factor_bytes=rs["payload_bytes"],
                         factor_dense_bytes=rs["dense_bytes"], buckets_early=rs["buckets_early"],
                         buckets=rs["buckets"])
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
            t0 = time.perf_counter()
            stats["inverse_bytes"] = float(distributed_update(
                self.blocks, todo, self._owners, cfg.damping, cfg.inverse_method, self.process_group,
                share=cfg.precondition_mode == "comm_opt"))
            stats["inversion_s"] = time.perf_counter() - t0

    def _preconditioned(self, stats: dict[str, float]) -> dict[tuple[int, int], Tensor]:
        """Update directions per optimizer parameter: F̂⁻¹g for block parameters (KL-clipped when configured)."""
        assert self._owners is not None
        ready = self.grads.available([i for i, b in enumerate(self.blocks) if b.has_preconditioner])
        if not ready:
            return {}
        owners = self._owners.owners
        mem_opt = self.cfg.precondition_mode == "mem_opt" and world_size(self.process_group) > 1
        grads, sent = self.grads.block_grads(ready, owners if mem_opt else None, self.process_group)
        me = rank(self.process_group)
        nat: dict[int, list[Tensor]] = {}
        vg = 0.0
        for i in ready:
            if mem_opt and owners[i] != me:
                continue
            nat[i] = self.blocks[i].precondition(grads[i])
            if self.cfg.kl_clip is not None:
                vg += sum(float((v * g.float()).sum()) for v, g in zip(nat[i], grads[i], strict=True))
        if mem_opt:
            shapes = {i: [tuple(p.shape) for p in self.blocks[i].params] for i in ready}
            nat, vg, shared = share_directions(nat, shapes, owners, vg, self.process_group)
            sent += shared
        stats["precondition_bytes"] = float(sent)
        if self.cfg.kl_clip is not None:
            lr = self.param_groups[0]["lr"]
            # lr = 0 (a warmup's first step) moves nothing: no clipping needed, and ν's formula would divide by 0
            nu = 1.0 if vg <= 0.0 or lr == 0.0 else min(1.0, math.sqrt(self.cfg.kl_clip / (lr * lr * vg)))
            stats["kl_clip_nu"] = nu
            if nu < 1.0:
                for vs in nat.values():
                    for v in vs:
                        v.mul_(nu)
        return self.grads.directions(nat)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one SP-NGD update (see the module docstring).

        Raises:
            FloatingPointError: naming the parameter whose gradient is NaN/Inf (agreed by every rank), or the block
                whose factor is; no parameter is modified in that case and this step's statistics are dropped.
        """
        if self.suspended:  # DeepSpeed's wrappers call step() once while being built, with zero gradients
            return None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        assert self.reducer is not None
        t_start = time.perf_counter()
        stats: dict[str, float] = {"factor_s": self.ctx.factor_seconds}
        self.ctx.factor_seconds = 0.0
        cfg = self.cfg
        refresh = self.steps % cfg.factor_update_steps == 0
        invert = self.steps % cfg.inv_update_steps == 0
        bad = self.grads.nonfinite(self.process_group)
        if bad is not None:
            self.reducer.discard()  # this batch's statistics are as suspect as its gradients
            raise FloatingPointError(
                f"SP-NGD step {self.steps}: gradient of {bad} is NaN/Inf; no parameter was updated")
        self._refresh_curvature(refresh, invert, stats)
        t0 = time.perf_counter()
        directions = self._preconditioned(stats)
        stats["precondition_s"] = time.perf_counter() - t0
        for gi, group in enumerate(self.param_groups):
            self._update_group(gi, group, directions)
        if cfg.weight_rescale:
            self._rescale_weights()
        stats["refresh"], stats["invert"] = float(refresh), float(invert)
        stats["optimizer_s"] = time.perf_counter() - t_start
        self.last_stats = stats
        self.steps += 1
        self.ctx.collecting = self.steps % cfg.factor_update_steps == 0
        return loss

    def _update_group(self, gi: int, group: dict[str, Any], nat: dict[tuple[int, int], Tensor]) -> None:
        """Momentum, weight decay and the parameter update, elementwise (works on ZeRO's flat partitions too)."""
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
        """SP-NGD weight rescaling: ‖W‖_F > sqrt(2·d_out) → W·sqrt(2·d_out)/‖W‖_F (norms summed over ZeRO pieces)."""
        ids = [i for i, b in enumerate(self.blocks) if b.kind == "kronecker"]
        pieces = [self.grads.weight(i) for i in ids]
        squares = torch.tensor([sum(float(w.double().pow(2).sum()) for w in ws) for ws in pieces], dtype=torch.float64)
        squares = self.grads.reduce_squares(squares, self.process_group)
        for i, ws, sq in zip(ids, pieces, squares.tolist(), strict=True):
            bound = math.sqrt(2.0 * self.blocks[i].params[0].shape[0])
            norm = math.sqrt(sq)
            if norm > bound:
                for w in ws:
                    w.mul_(bound / norm)

    def discard_step(self) -> None:
        """Forget the statistics gathered since the last step (DeepSpeed skipped the step: fp16 overflow).

        Factors, preconditioners, momentum and counters stay exactly as they were; pending factor collectives are
        completed and dropped so every rank's collective sequence stays aligned.
        """
        self.ctx.factor_seconds = 0.0
        if self.reducer is not None and self.ctx.collecting:
            self.reducer.discard()

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
    def spngd_state(self) -> dict[str, Any]:
        """SP-NGD's own state on this rank: step counter, config, and every block's factors / preconditioner as held
        here (factor values on their owner only; preconditioners on every rank with comm_opt, owners with mem_opt)."""
        return {
            "steps": self.steps,
            "config": self.cfg.model_dump(),
            "world_size": world_size(self.process_group),
            "rank": rank(self.process_group),
            "blocks": {b.name: b.state_dict() for b in self.blocks},
        }

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["spngd"] = self.spngd_state()
        return sd

    def load_sharded_state(self, shards: list[dict[str, Any]]) -> None:
        """Restore SP-NGD's state from every rank's :meth:`spngd_state` (any world size: each factor's value is
        taken from the shard that holds it, the preconditioner from any shard that holds one).

        Raises:
            ValueError: no shard, shards from different steps, or Fisher blocks that do not match the model's.
        """
        if not shards:
            raise ValueError("no SP-NGD state shard to load")
        steps = {int(s["steps"]) for s in shards}
        if len(steps) != 1:
            raise ValueError(f"SP-NGD state shards come from different steps {sorted(steps)}")
        merged: dict[str, dict[str, Any]] = {}
        for shard in shards:
            self._check_block_names(shard["blocks"])
            for name, state in shard["blocks"].items():
                cur = merged.setdefault(name, dict(state))
                for key, val in state.items():
                    if isinstance(val, dict) and val.get("value") is not None:
                        cur[key] = val  # a factor held by this shard's rank
                    elif key == "preconditioner" and val is not None:
                        cur[key], cur["method"] = val, state.get("method")
                    elif key == "ready":
                        cur[key] = bool(cur.get(key)) or bool(val)
        for b in self.blocks:
            b.load_state_dict(merged[b.name])
        self.steps = steps.pop()
        self.ctx.collecting = self.steps % self.cfg.factor_update_steps == 0

    def _check_block_names(self, saved: dict[str, Any]) -> None:
        names = {b.name for b in self.blocks}
        if set(saved) != names:
            raise ValueError(
                f"checkpoint Fisher blocks {sorted(saved)} do not match the model's {sorted(names)} "
                f"(missing: {sorted(names - set(saved))}, unexpected: {sorted(set(saved) - names)})")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's contract plus SP-NGD's blocks; the blocks are checked before anything is modified.

        Raises:
            ValueError: the checkpoint's Fisher blocks do not match this model's (names listed).
        """
        sd = dict(state_dict)
        extra = sd.pop("spngd", None)
        if extra is not None:
            self._check_block_names(extra["blocks"])
        super().load_state_dict(sd)
        if extra is not None:
            self.load_sharded_state([extra])

    def remove_hooks(self) -> None:
        """Detach every hook this optimizer installed (the model is left as it was)."""
        for b in self.blocks:
            b.remove()
        if self._mc_handle is not None:
            self._mc_handle.remove()
            self._mc_handle = None
