"""SP-NGD: the natural-gradient optimizer (K-FAC preconditioning + SP-NGD's update rule).

Per optimizer step t (Osawa et al. CVPR 2019, arXiv:1811.12019 §3–4; TPAMI 2020, arXiv:2002.06015):

1. on factor-refresh steps (t mod factor_update_steps = 0) the factors captured by the module hooks during this
   step's forward/backward passes are reduced to their owner ranks — packed, bucketed and launched from the hooks
   as soon as they are final (:mod:`ds_spngd.comm.factor_reduction`);
2. every rank agrees on the step's health with one small all-reduce (:mod:`ds_spngd.comm.agreement`): NaN/Inf in
   any gradient or reduced factor, contributions that missed their bucket. Then every rank continues, raises the
   same error naming the layer, or skips the step (``nonfinite``); the factors are folded into their running
   averages only after that;
3. on inversion steps (t mod inv_update_steps = 0) every block's damped inverse/eigendecomposition is drafted by
   its owner rank (LPT on d³, :mod:`ds_spngd.comm.assignment`), agreed by every rank, and installed from one buffer
   per owner — broadcast to every rank with ``precondition_mode="comm_opt"`` (:mod:`ds_spngd.comm.inversion`);
4. each preconditioned block's gradient g becomes ĝ = F̂⁻¹ g (by every rank, or by the owner and broadcast with
   ``"mem_opt"`` and ``"reduce_scatter"``, where the gradients themselves were reduced to the owners instead of
   all-reduced by DeepSpeed; :mod:`ds_spngd.precondition`); parameters without a block keep g;
5. KL-clipping, heavy-ball momentum with weight decay, weight rescaling (:mod:`ds_spngd.update`).

A skipped step (``nonfinite: "skip"``) leaves factors, preconditioners, momentum, counters and parameters exactly as
they were on every rank and sets ``overflow`` so DeepSpeed counts it like its fp16 overflow skip (no LR-scheduler
step); more than ``max_consecutive_skips`` in a row raise.

Steps 1–3 and the failure path are :mod:`ds_spngd.transaction`, step 4 is the placement strategy of
``precondition_mode`` (:mod:`ds_spngd.placement`), step 5 :mod:`ds_spngd.update`. Every tensor lives on the device of
the parameters it serves; the step's host syncs are O(1) (the agreement, and on inversion steps the Cholesky status
check and the inversion agreement), never per layer. Gradients are reached through a
:class:`ds_spngd.gradients.GradientAccess` (whole parameters by default; an engine integration hands in its own,
e.g. ZeRO 1/2/3 partitions from :mod:`ds_spngd.integrations.deepspeed.zero`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ds_spngd.checkpoint import check_block_names, load_state, pack_state, pending_inversion
from ds_spngd.comm.agreement import StepFailure
from ds_spngd.comm.async_inversion import AsyncInversion
from ds_spngd.comm.collectives import rank, world_size
from ds_spngd.comm.factor_reduction import FactorReducer
from ds_spngd.comm.inversion import OwnerPlan
from ds_spngd.config import SPNGDConfig, parse_spngd_params
from ds_spngd.curvature.base import CaptureContext, FisherBlock, full_shape
from ds_spngd.curvature.model_output import ModelOutputHook
from ds_spngd.curvature.registry import build_blocks, describe_blocks
from ds_spngd.distributed import DistributedPlan, plan_distributed
from ds_spngd.gradients import DenseGradients, GradientAccess
from ds_spngd.memory import agree_on_memory, memory_plan, memory_usage
from ds_spngd.placement import DirectionInputs, Placement, directions
from ds_spngd.polar import PolarSettings
from ds_spngd.staleness import RefreshSchedule
from ds_spngd.startup import ParamGuard, coverage, warn_if_little_preconditioned
from ds_spngd.transaction import LedgerField, SkipLedger, agree_on_inputs, refresh_preconditioners, report_silent_hooks
from ds_spngd.update import WeightRescaler, apply_group

__all__ = ["SPNGD"]

logger = logging.getLogger("ds_spngd")


class SPNGD(torch.optim.Optimizer):
    """Scalable and Practical Natural Gradient Descent (distributed K-FAC) for DeepSpeed.

    Args:
        params: the model's parameters or parameter groups (groups may override lr, momentum, weight_decay).
        model: the raw (unwrapped) model whose Linear/Conv2d/BatchNorm/LayerNorm modules get Fisher blocks. Build the
            optimizer *before* ``deepspeed.initialize`` (``ds_spngd.initialize`` does this).
        config: an :class:`SPNGDConfig` or the JSON ``optimizer.params`` dict; keyword overrides win.
        process_group: data-parallel group (None = world); SP-NGD communicates on a private copy of it.

    Attributes:
        overflow: True after a step this optimizer skipped (DeepSpeed reads it like its fp16 overflow flag).
        skipped_steps: steps skipped so far (``nonfinite: "skip"``, or DeepSpeed's NaN/Inf skips outside fp16).
        consecutive_skips: skipped steps since the last applied one.

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
            cfg = parse_spngd_params({**config.model_dump(), **overrides}) if overrides else config
        else:
            cfg = parse_spngd_params({**(config or {}), **overrides})
        self.cfg = cfg
        super().__init__(params, {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay})
        self.ctx = CaptureContext(fisher_type=cfg.fisher_type, loss_reduction=cfg.loss_reduction,
                                  kfac_approx=cfg.kfac_approx, sample_fraction=cfg.factor_sample_fraction)
        # DeepSpeed drops empty groups (engine.py, _configure_optimizer): drop them too, so group indices agree
        self.param_groups[:] = [g for g in self.param_groups if g["params"]]
        positions = {id(p): (gi, pi) for gi, g in enumerate(self.param_groups) for pi, p in enumerate(g["params"])}
        self._model_params = [p for g in self.param_groups for p in g["params"]]  # before DeepSpeed replaces them
        plan = build_blocks(model, self.ctx, set(positions), cfg.skip_modules, cfg.max_factor_dim,
                            cfg.large_dim_method)
        self.blocks: list[FisherBlock] = plan.blocks
        self.fallback: list[tuple[str, str]] = plan.fallback
        self._positions = [[positions[id(p)] for p in b.params] for b in self.blocks]
        names = {id(p): n for n, p in model.named_parameters()}
        self._param_names = [names.get(id(p), f"param_groups[{gi}][{pi}]")
                             for gi, g in enumerate(self.param_groups) for pi, p in enumerate(g["params"])]
        for b in self.blocks:
            for f in b.factors:
                f.precision = cfg.factor_dtype
            b.register()
        self._output_hook = ModelOutputHook(model, self.ctx)  # loss terms; the MC Fisher's sampled backward
        self.refresh = RefreshSchedule(self.blocks, cfg.factor_update_steps, cfg.stale_statistics, cfg.stale_tolerance,
                                       cfg.stale_max_interval, cfg.factor_decay)  # which factors refresh when
        self.ctx.collecting = self.refresh.plan(0)
        self._dist: DistributedPlan | None = None  # owners, factor reducer, placement (setup_distributed)
        self.grads: GradientAccess = DenseGradients(self, self._positions, self.blocks, self._param_names)
        self.ledger = SkipLedger(cfg.nonfinite, cfg.max_consecutive_skips)
        self.inverter = AsyncInversion(cfg.inverse_delay) if cfg.async_inverse else None  # async_inverse's worker
        self.dp_group: Any = process_group
        self.group: Any = None
        self.steps = 0
        self.setup_distributed(process_group)
        # an engine integration's setup_distributed() sets this to None; until then step() checks the param groups
        self._param_guard: ParamGuard | None = ParamGuard(self.param_groups)
        self._reported_silent = False
        self._rescaled = [i for i, b in enumerate(self.blocks) if b.kind == "kronecker"]  # weight rescaling
        self._rescaler = WeightRescaler([full_shape(self.blocks[i].params[0])[0] for i in self._rescaled])
        self._polar = PolarSettings(cfg.polar_momentum, cfg.polar_nesterov, cfg.polar_steps) \
            if cfg.direction == "polar" else None
        self._stats: dict[str, float | Tensor] = {}
        self.engine_times: dict[str, float] = {}  # forward/backward seconds of the current step (set by attach)
        logger.debug("%s", self.report())
        warn_if_little_preconditioned(self, model)  # rank 0: little or nothing preconditioned (ds_spngd.startup)

    # ---- reporting --------------------------------------------------------------------------------------------
    def report(self) -> str:
        """Human-readable list of the preconditioned modules and of those left to the base update."""
        covered, total = coverage(self)
        share = f"{covered / total:.1%}" if total else "none"
        return (describe_blocks(self.blocks, self.fallback)
                + f"\nFisher blocks cover {share} of the {total:,} trainable parameter elements ({covered:,})")

    @property
    def last_stats(self) -> dict[str, float]:
        """The last step's timings (s), bytes and flags as floats (device scalars are fetched here, once)."""
        pending = [k for k, v in self._stats.items() if isinstance(v, Tensor)]
        if pending:
            values = torch.stack([self._stats[k].reshape(()).float() for k in pending]).tolist()  # type: ignore[union-attr]
            self._stats.update(zip(pending, values, strict=True))
        return {k: float(v) for k, v in self._stats.items()}

    def memory_usage(self) -> dict[str, int]:
        """Bytes of SP-NGD state this rank holds now: factors, accumulators, preconditioners, comm_buffers, momentum,
        total (:func:`ds_spngd.memory.memory_usage`)."""
        return memory_usage(self)

    def memory_plan(self, rank: int | None = None) -> dict[str, int]:
        """Bytes a rank (default: this one) holds on a refresh + inversion step, from the shapes alone
        (:func:`ds_spngd.memory.memory_plan`)."""
        return memory_plan(self, rank)

    # ---- distributed set-up -----------------------------------------------------------------------------------
    def setup_distributed(self, group: Any = None, gradients: GradientAccess | None = None) -> None:
        """Plan owners, factor buckets, the placement and the gradient access for the data-parallel ``group``.

        Runs in the constructor (``group`` None = world) and again from an engine integration once the engine is
        built (:func:`ds_spngd.initialize`: DeepSpeed's data-parallel group, and ``gradients`` = the engine's gradient
        layout, e.g. ZeRO 1/2/3 partitions; None keeps the current one, :class:`ds_spngd.gradients.DenseGradients` at
        first). A collective on first use of a group: SP-NGD's private communicator is created here
        (:func:`ds_spngd.comm.collectives.private_group`). After a call from an integration, :meth:`step` no longer
        checks that ``param_groups`` hold the parameters SP-NGD was built with (:class:`ds_spngd.startup.ParamGuard`).

        Raises:
            RuntimeError: after the first step (re-planning then would change the collective order mid-run).
            ValueError: the placement cannot work with these gradients (``reduce_scatter`` with ZeRO partitions).
            MemoryError: ``memory_check`` and the planned SP-NGD state does not fit the memory free on the device
                (:func:`ds_spngd.memory.check_memory`).
        """
        if self._dist is not None and (self.steps > 0 or self._dist.reducer.in_flight):
            raise RuntimeError("setup_distributed() must run before the first optimizer step")
        if gradients is not None:
            self.grads = gradients
        self.dp_group = group
        self._dist = plan_distributed(self.blocks, self.cfg, self.refresh, group, self.grads, self._dist)
        self.group = self._dist.group
        if self.cfg.memory_check:  # before any curvature tensor exists (raises MemoryError naming the keys to turn)
            agree_on_memory(self)
        self._param_guard = None  # an engine set SP-NGD up: step() stops checking param_groups (see __init__)

    @property
    def owner_plan(self) -> OwnerPlan | None:
        """Who owns which block part (:class:`ds_spngd.comm.inversion.OwnerPlan`; identical on every rank)."""
        return None if self._dist is None else self._dist.owners

    @property
    def reducer(self) -> FactorReducer | None:
        """The factor reducer (buckets of packed factors reduced to their owners)."""
        return None if self._dist is None else self._dist.reducer

    @property
    def placement(self) -> Placement:
        """The ``precondition_mode`` strategy in force (:mod:`ds_spngd.placement`)."""
        assert self._dist is not None
        return self._dist.placement

    @property
    def reduces_gradients(self) -> bool:
        """True when SP-NGD reduces the gradients itself (``reduce_scatter`` on several ranks): an engine must turn
        its own gradient all-reduce off."""
        return self.placement.reduces_gradients

    def begin_backward(self, boundary: bool) -> None:
        """An engine calls this before every backward: ``boundary`` when it ends a gradient-accumulation cycle
        (the ``reduce_scatter`` hooks launch their buckets only then)."""
        self.placement.begin_backward(boundary)

    @property
    def model_parameters(self) -> list[Tensor]:
        """The parameters the optimizer was built with (the model's, before an engine replaced them by copies or
        partitions), ``param_groups`` order."""
        return list(self._model_params)

    def params_without_block(self) -> list[Tensor]:
        """The optimizer's parameters that no Fisher block preconditions (``param_groups`` order)."""
        taken = {pos for ps in self._positions for pos in ps}
        return [p for gi, g in enumerate(self.param_groups) for pi, p in enumerate(g["params"])
                if (gi, pi) not in taken]

    @property
    def rank(self) -> int:
        """This process's rank in SP-NGD's group."""
        return rank(self.group)

    @property
    def device(self) -> torch.device:
        """The device SP-NGD computes and communicates on: its parameters' (read now, after DeepSpeed moved them)."""
        if self.blocks:
            return self.blocks[0].device
        return next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))

    # ---- the step ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one SP-NGD update (see the module docstring).

        Under ZeRO DeepSpeed calls this once per flat partition (ZeRO 1/2: per parameter group, ``param_groups``
        narrowed to it; ZeRO 3: per sub-group); the update of every group happens on the last call
        (:mod:`ds_spngd.integrations.deepspeed.zero_steps`), the earlier calls only keep their gradient.

        Raises:
            FloatingPointError: (``nonfinite: "raise"``, or more than ``max_consecutive_skips`` skips in a row)
                naming the layers whose gradients, reduced factors or inversions are NaN/Inf / failed — raised on
                every rank at the same point; no parameter, factor, preconditioner, momentum or counter changed.
            RuntimeError: a factor got contributions after its bucket was sent (every rank, same message); or, before
                anything runs, no engine integration set SP-NGD up and its ``param_groups`` no longer hold the
                parameters it was built with (handed to ``deepspeed.initialize`` directly: use
                ``ds_spngd.initialize``; :class:`ds_spngd.startup.ParamGuard`, every rank alike).
        """
        if self._param_guard is not None:  # no engine integration set SP-NGD up: were its parameters replaced?
            self._param_guard.check(self.param_groups)
        groups = self.grads.begin_step(self.param_groups)
        if groups is None:  # an earlier partition's call under ZeRO: its gradient is kept for the last call
            return None
        narrowed, self.param_groups = self.param_groups, groups
        completed = False
        try:
            loss = self._step(closure)
            completed = True
            return loss
        finally:
            self.param_groups = narrowed
            self.grads.end_step(completed)

    def _step(self, closure: Callable[[], float] | None) -> float | None:
        """The update of every group in ``param_groups`` (see :meth:`step`)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.ledger.overflow = False
        t_start = time.perf_counter()
        stats: dict[str, float | Tensor] = {"factor_s": self.ctx.factor_seconds}
        self.ctx.factor_seconds = 0.0
        cfg = self.cfg
        collect = self.ctx.collecting  # planned at the end of the previous step (every rank alike)
        invert = self.steps % cfg.inv_update_steps == 0
        device = self.device
        assert self._dist is not None
        reducer, plan, placement = self._dist.reducer, self._dist.owners, self._dist.placement
        try:
            agree_on_inputs(reducer, self.refresh, self.grads, self.group, collect, self.steps, cfg.factor_decay,
                            device, stats)
            if collect and not self._reported_silent:
                self._reported_silent = report_silent_hooks(self.blocks, self.rank)
            refresh_preconditioners(self.blocks, self.refresh, plan, placement, cfg.damping, cfg.inverse_method,
                                    self.group, invert, device, stats, self.inverter, self.steps)
        except StepFailure as failure:
            reducer.rollback()
            self.refresh.discard()
            placement.discard()
            self.ctx.factor_seconds = 0.0
            self.note_skipped(self.ledger.fail(failure.problems, self.steps))
            return loss
        reducer.settle()
        self.refresh.apply()
        t0 = time.perf_counter()
        job = DirectionInputs(self.blocks, self.grads, plan.block_owners, self.group, device, cfg.kl_clip,
                              float(self.param_groups[0]["lr"]), self.params_without_block(), self._polar)
        found, final = directions(placement, job, stats)
        stats["precondition_s"] = time.perf_counter() - t0
        for gi, group in enumerate(self.param_groups):
            apply_group(group, gi, self.state, found, cfg.momentum_correction, final)
        if cfg.weight_rescale:
            self._rescaler([self.grads.weight(i) for i in self._rescaled], device,
                           lambda sq: self.grads.reduce_squares(sq, self.group))
        stats["refresh"], stats["invert"], stats["skipped"] = float(collect), float(invert), 0.0
        stats["refresh_fraction"] = self.refresh.refresh_fraction()
        if cfg.stale_statistics:
            stats.update(self.refresh.block_fractions())
        stats["optimizer_s"] = time.perf_counter() - t_start
        self._stats = stats
        self.steps += 1
        self.ledger.applied()
        self.plan_collection()
        return loss

    def plan_collection(self) -> None:
        """Decide which factors the next step refreshes (:mod:`ds_spngd.staleness`; every rank alike)."""
        self.ctx.collecting = self.refresh.plan(self.steps)
        if self._dist is not None:
            self._dist.reducer.set_due(self.refresh.due_mask())

    def refresh_intervals(self) -> dict[str, int]:
        """Factor name → its current refresh interval in factor-update slots (``stale_statistics``; 1 otherwise)."""
        return self.refresh.intervals()

    # ---- skipped steps (:class:`ds_spngd.transaction.SkipLedger` owns the counters) -------------------------------
    overflow = LedgerField("overflow", "True after a step this optimizer skipped (an engine reads it like its fp16 "
                           "overflow flag).", writable=True)
    skipped_steps = LedgerField("skipped_steps", 'Steps skipped so far (``nonfinite: "skip"``, or engine skips).')
    consecutive_skips = LedgerField("consecutive_skips", "Skipped steps since the last applied one.")
    last_skip_reason = LedgerField("last_skip_reason", "Why the last skipped step was skipped.")

    def note_skipped(self, reason: str) -> None:
        """Count a skipped step (this optimizer's own, or one an engine skipped for NaN/Inf gradients outside fp16).

        Raises:
            FloatingPointError: ``max_consecutive_skips`` steps in a row were skipped already.
        """
        self.ledger.note(reason, self.rank)
        self._stats = {"skipped": 1.0}

    def discard_step(self) -> None:
        """Forget the statistics gathered since the last step (an engine skipped the step: fp16 overflow).

        Factors, preconditioners, momentum and counters stay exactly as they were; pending factor collectives are
        completed and dropped so every rank's collective sequence stays aligned.
        """
        self.ctx.factor_seconds = 0.0
        if self._dist is not None:
            if self.ctx.collecting:
                self._dist.reducer.discard()
            self._dist.placement.discard()

    # ---- engine hooks -----------------------------------------------------------------------------------------
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
        """SP-NGD's own state on this rank (:func:`ds_spngd.checkpoint.pack_state`)."""
        state = pack_state(self.steps, self.ledger, self.cfg.model_dump(), world_size(self.group), self.rank,
                           self.blocks, self.refresh)
        state["async_inversion"] = None if self.inverter is None else self.inverter.state()  # this rank's own
        return state

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["spngd"] = self.spngd_state()
        return sd

    def load_sharded_state(self, shards: list[dict[str, Any]]) -> None:
        """Restore SP-NGD's state from every rank's :meth:`spngd_state` (any world size; merged by
        :func:`ds_spngd.checkpoint.load_state`, tensors moved to each block's device).

        Raises:
            ValueError: no shard, shards from different steps, or Fisher blocks that do not match the model's.
        """
        self.steps = load_state(shards, self.blocks, self.ledger, self.refresh)
        if self.inverter is not None:  # a pending asynchronous inversion: this rank's own shard holds its part
            self.inverter.load(pending_inversion(shards, self.rank, world_size(self.group)), self.device)
        self.plan_collection()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's contract plus SP-NGD's blocks; the blocks are checked before anything is modified.

        Raises:
            ValueError: the checkpoint's Fisher blocks do not match this model's (names listed).
        """
        sd = dict(state_dict)
        extra = sd.pop("spngd", None)
        if extra is not None:
            check_block_names(extra["blocks"], [b.name for b in self.blocks])
        super().load_state_dict(sd)
        if extra is not None:
            self.load_sharded_state([extra])

    def remove_hooks(self) -> None:
        """Detach every hook this optimizer installed (the model is left as it was)."""
        for b in self.blocks:
            b.remove()
        self._output_hook.remove()
        if self._dist is not None:
            self._dist.placement.remove()
        if self.inverter is not None:
            self.inverter.close()
