"""Every place where the glue patches a DeepSpeed object or leans on a DeepSpeed internal, in one list
(:data:`PATCHES`), each with the DeepSpeed source lines it relies on and a probe that fails when a DeepSpeed upgrade
moves them (``tests/integrations/test_patches.py`` runs every probe, and checks the installed DeepSpeed against
:data:`SUPPORTED_DEEPSPEED`, the range ``pyproject.toml`` pins).

Seams DeepSpeed 0.19.8 offers, and what the glue does with them:

* ``deepspeed.initialize(optimizer=...)`` takes a client optimizer: SP-NGD and the LARS / Lamb baselines go in that
  way, so DeepSpeed's schedulers, monitors, precision wrappers and checkpoints work unchanged.
* Unknown top-level JSON keys are accepted: ``gradient_noise_scale`` lives there.
* The engine is a ``torch.nn.Module``: SP-NGD's forward time is taken by torch forward hooks on it (no patch).
* The engine reads ``optimizer.overflow`` after each step (``_take_model_step``) to count skipped steps and hold the
  LR scheduler: SP-NGD sets its own ``overflow`` (stage 0 fp32), and torch's step hooks on SP-NGD copy it to a
  wrapper's ``overflow`` (:data:`PATCHES` ``wrapper.overflow``: the wrapper's attribute is written).
* ``engine.monitor.write_events`` takes any scalars: timings, bytes and the noise scale go there.

Seams it does not offer, hence the patches below: no engine class argument (``deepspeed.initialize`` builds
``DeepSpeedEngine`` itself; subclassing would mean re-implementing ``initialize``'s config, mesh and pipeline/hybrid
dispatch), no callback around ``backward`` / ``step`` / ``allreduce_gradients`` / checkpointing, no per-rank file in
a checkpoint at stage 0 (only data-parallel rank 0 writes the optimizer state; ``client_state`` goes into that one
file), no option to skip the step the fp16/bf16 wrappers take while being built, and no public view of this rank's
ZeRO 1/2 fragments (``deepspeed.utils.safe_get_full_grad`` & co. are per-parameter collectives returning full
tensors). Each patch replaces an attribute on the one engine / wrapper instance, never a DeepSpeed class or module.

Line numbers are those of DeepSpeed :data:`DOCUMENTED_VERSION`, paths relative to the installed ``deepspeed``
package; the probes match statements, not line numbers, so they keep passing where DeepSpeed only moved code around.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Anchor", "DOCUMENTED_VERSION", "PATCHES", "Patch", "SUPPORTED_DEEPSPEED", "problems"]

SUPPORTED_DEEPSPEED = ">=0.19.8,<0.20"  # keep equal to pyproject.toml's deepspeed requirement
DOCUMENTED_VERSION = "0.19.8"  # the version whose line numbers the anchors cite

_ENGINE = "deepspeed.runtime.engine"
_ZERO = "deepspeed.runtime.zero.stage_1_and_2"
_BF16 = "deepspeed.runtime.bf16_optimizer"
_UNFUSED = "deepspeed.runtime.fp16.unfused_optimizer"
_FUSED = "deepspeed.runtime.fp16.fused_optimizer"
_FRAGMENT = "deepspeed.utils.tensor_fragment"
_LINKAGE = "deepspeed.utils.mixed_precision_linkage"
_STAGE3 = "deepspeed.runtime.zero.stage3"
_PARTITION = "deepspeed.runtime.zero.partition_parameters"


def _norm(text: str) -> str:
    return " ".join(text.split())


def _undecorated(obj: Any, name: str) -> Any:
    obj = inspect.unwrap(obj) if callable(obj) else obj
    if inspect.isfunction(obj) and obj.__name__ != name:  # a decorator without functools.wraps: find the original
        for cell in obj.__closure__ or ():
            inner = cell.cell_contents
            if inspect.isfunction(inner) and inner.__name__ == name:
                return inner
    return obj


@dataclass(frozen=True)
class Anchor:
    """One DeepSpeed source location a patch relies on.

    Attributes:
        module: the DeepSpeed module (``"deepspeed.runtime.engine"``).
        qualname: a class, function or method in it (``"DeepSpeedEngine.step"``).
        contains: one source line (compared with whitespace collapsed) that must stand in its source; ``""``: the
            object must merely exist.
        line: the line of ``contains`` (else of the ``def`` / ``class``) in DeepSpeed :data:`DOCUMENTED_VERSION`.
        params: parameter names its signature must have.
        absent: an attribute name that must NOT exist: not on the class ``qualname``, not assigned as ``self.<name>``
            anywhere in ``module`` (a name the glue adds to a DeepSpeed instance).
    """

    module: str
    qualname: str
    contains: str = ""
    line: int | None = None
    params: tuple[str, ...] = ()
    absent: str = ""

    @property
    def where(self) -> str:
        """``deepspeed/runtime/engine.py DeepSpeedEngine.step l. 3567`` (the path relative to site-packages)."""
        path = self.module.replace(".", "/") + ".py"
        return f"{path} {self.qualname}" + (f" l. {self.line}" if self.line is not None else "")

    def resolve(self) -> Any:
        """The object ``qualname`` names, decorators unwrapped (also DeepSpeed's ``instrument_w_nvtx``, which does not
        set ``__wrapped__``). Raises ImportError / AttributeError."""
        obj: Any = importlib.import_module(self.module)
        for part in self.qualname.split("."):
            obj = _undecorated(getattr(obj, part), part)
        return obj

    def located_lines(self) -> list[int]:
        """The lines holding ``contains`` (comments skipped; else the ``def`` / ``class`` line) in the installed
        DeepSpeed; empty when not found."""
        try:
            lines, start = inspect.getsourcelines(self.resolve())
        except (ImportError, AttributeError, OSError, TypeError):
            return []
        code = [(start + i, _norm(text)) for i, text in enumerate(lines) if not text.lstrip().startswith("#")]
        if not self.contains:
            return [n for n, text in code if text.startswith(("def ", "class "))][:1]
        want = _norm(self.contains)
        return [n for n, text in code if want in text]

    def problem(self) -> str | None:
        """None when the installed DeepSpeed still has what this anchor names, else what is missing."""
        try:
            obj = self.resolve()
        except (ImportError, AttributeError) as err:
            return f"{self.where}: {self.module}.{self.qualname} not found ({err})"
        if self.contains and not self.located_lines():
            return f"{self.where}: its source no longer contains {self.contains!r}"
        if self.params:
            names = set(inspect.signature(obj).parameters)
            missing = [p for p in self.params if p not in names]
            if missing:
                return f"{self.where}: its signature lacks {missing}"
        if self.absent:
            source = inspect.getsource(importlib.import_module(self.module))
            if hasattr(obj, self.absent) or f"self.{self.absent} " in source or f"self.{self.absent}=" in source:
                return f"{self.where}: DeepSpeed now defines {self.absent!r} itself, which the glue sets"
        return None


Action = Literal["wraps", "sets", "reads", "relies"]


@dataclass(frozen=True)
class Patch:
    """One patch or internal the glue depends on.

    Attributes:
        name: ``<object>.<attribute>`` as the glue sees it (``"engine.step"``).
        action: ``"wraps"`` (replaces a method on the instance by a wrapper calling the original), ``"sets"`` (writes an
            attribute on the instance), ``"reads"`` (reads a private or undocumented name), ``"relies"`` (depends on
            an undocumented calling pattern).
        attribute: the attribute name itself (what ``tests/integrations/test_patches.py`` matches against the glue's
            assignments).
        glue: the glue function doing it.
        why: why no seam serves instead.
        anchors: the DeepSpeed lines it relies on; every one's probe must pass.
    """

    name: str
    action: Action
    attribute: str
    glue: str
    why: str
    anchors: tuple[Anchor, ...]

    def problems(self) -> list[str]:
        """What the installed DeepSpeed no longer offers of this patch's anchors (empty: all still there)."""
        return [f"{self.name}: {p}" for a in self.anchors if (p := a.problem()) is not None]


_BOUNDARY = Anchor(_ENGINE, "DeepSpeedEngine.is_gradient_accumulation_boundary", line=3442)
_TAKE_STEP_OVERFLOW = Anchor(_ENGINE, "DeepSpeedEngine._take_model_step", "overflow = self.optimizer.overflow",
                             line=3537)
_ZERO_COPY_BACK = (
    Anchor(_ZERO, "DeepSpeedZeroOptimizer.step", "bit16_partitions = self.parallel_partitioned_bit16_groups[i]",
           line=3143),
    Anchor(_ZERO, "DeepSpeedZeroOptimizer.step", "fp32_partition = self.single_partition_of_fp32_groups[i]",
           line=3144),
    Anchor(_ZERO, "DeepSpeedZeroOptimizer.step", "bit16_partitions[partition_id].data.copy_(fp32_partition.data)",
           line=3145),
)
_ZERO_LINK = Anchor(
    _ZERO, "DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state",
    "lazy_init_hp_params_optimizer_state(self.bit16_groups[i], self.single_partition_of_fp32_groups[i],", line=855)

PATCHES: tuple[Patch, ...] = (
    Patch("engine.backward", "wraps", "backward", "engine._wrap_backward",
          "times each backward (SPNGD/backward_s) and, for precondition_mode 'reduce_scatter', tells SP-NGD whether "
          "this backward ends the accumulation cycle (spngd.begin_backward) before its gradient hooks fire; DeepSpeed "
          "has no callback around backward, and torch's tensor hooks fire per gradient, not before the call",
          (Anchor(_ENGINE, "DeepSpeedEngine.backward", line=3382, params=("loss", "retain_graph", "scale_wrt_gas")),
           Anchor(_ENGINE, "DeepSpeedEngine.backward", "self._backward_epilogue()", line=3431), _BOUNDARY)),
    Patch("engine.enable_backward_allreduce", "sets", "enable_backward_allreduce",
          "engine._wrap_backward, decentralized_engine.initialize_decentralized",
          "precondition_mode 'reduce_scatter': SP-NGD reduces the gradients itself, so DeepSpeed's all-reduce is "
          "turned off with the engine's own switch (the one its removed 1-bit optimizers used); no public setter. "
          "DecentLaM / DmSGD: each rank steps with its local gradient and averages parameters with its neighbours",
          (Anchor(_ENGINE, "DeepSpeedEngine.__init__", "self.enable_backward_allreduce = True", line=548),
           Anchor(_ENGINE, "DeepSpeedEngine._backward_epilogue",
                  "if self.enable_backward_allreduce and not self.inside_no_sync_ctxt:", line=3163))),
    Patch("engine.step", "wraps", "step", "engine._wrap_step",
          "after a boundary step: drop SP-NGD's statistics when DeepSpeed skipped the optimizer (fp16 overflow, NaN "
          "norm), re-link ZeRO's optimizer-state fragments, write SP-NGD's scalars to the monitor; DeepSpeed has no "
          "post-step callback, and a skipped step never reaches the optimizer, so torch's step hooks cannot see it",
          (Anchor(_ENGINE, "DeepSpeedEngine.step", "if self.is_gradient_accumulation_boundary():", line=3611),
           Anchor(_ENGINE, "DeepSpeedEngine._take_model_step", "self.optimizer.step()", line=3516),
           Anchor(_ENGINE, "DeepSpeedEngine._take_model_step", "self.global_steps += 1", line=3558), _BOUNDARY)),
    Patch("wrapper.overflow", "sets", "overflow", "engine._report_skips_as_overflow",
          "a step SP-NGD skipped (nonfinite 'skip') must count as DeepSpeed's overflow skip (skipped_steps, LR "
          "scheduler held); the engine reads the wrapper's overflow, which the ZeRO / bf16 / fp16 wrappers reset at "
          "the start of their step, so torch step hooks on SP-NGD set it after SP-NGD's step",
          (_TAKE_STEP_OVERFLOW,
           Anchor(_ENGINE, "DeepSpeedEngine._take_model_step", "self.skipped_steps += 1", line=3541),
           Anchor(_ZERO, "DeepSpeedZeroOptimizer.step", "self.overflow = False", line=3028),
           Anchor(_BF16, "BF16_Optimizer.step", "self.overflow = False", line=388),
           Anchor(_UNFUSED, "FP16_UnfusedOptimizer.step", "self.optimizer.step()", line=230))),
    Patch("engine.save_checkpoint", "wraps", "save_checkpoint",
          "checkpoint.attach_checkpoint, decentralized_engine.attach_decentralized_checkpoint",
          "every rank writes its SP-NGD shard (DecentLaM / DmSGD: its own parameters and momentum, replicas differ) "
          "into the tag directory: at stage 0 DeepSpeed saves the module and optimizer state of data-parallel rank 0 "
          "only, and client_state goes into that one file; the default tag is DeepSpeed's",
          (Anchor(_ENGINE, "DeepSpeedEngine.save_checkpoint", line=4869, params=("save_dir", "tag")),
           Anchor(_ENGINE, "DeepSpeedEngine.save_checkpoint", 'tag = f"global_step{self.global_steps}"',
                  line=4903))),
    Patch("engine.load_checkpoint", "wraps", "load_checkpoint",
          "checkpoint.attach_checkpoint, decentralized_engine.attach_decentralized_checkpoint",
          "every rank checks and reads all SP-NGD shards (DecentLaM / DmSGD: its own file) of the tag before "
          "DeepSpeed loads anything, resolving tag=None as DeepSpeed does (the latest / latest_universal file); no "
          "load callback",
          (Anchor(_ENGINE, "DeepSpeedEngine.load_checkpoint", line=4395, params=("load_dir", "tag",
                                                                                   "load_optimizer_states")),
           Anchor(_ENGINE, "DeepSpeedEngine.load_checkpoint",
                  'latest_tag = "latest_universal" if self.load_universal_checkpoint() else "latest"', line=4428),
           Anchor(_ENGINE, "DeepSpeedEngine.load_checkpoint", "latest_path = os.path.join(load_dir, latest_tag)",
                  line=4429),
           Anchor(_ENGINE, "DeepSpeedEngine.load_checkpoint", "return load_path, client_states", line=4490))),
    Patch("engine.allreduce_gradients", "wraps", "allreduce_gradients", "noise_scale.attach_noise_scale",
          "the gradient noise scale needs the gradient norm just before and just after DeepSpeed's stage-0 "
          "all-reduce; no callback around it",
          (Anchor(_ENGINE, "DeepSpeedEngine.allreduce_gradients", line=3073, params=("bucket_size",)),
           Anchor(_ENGINE, "DeepSpeedEngine._backward_epilogue", "self.allreduce_gradients()", line=3165))),
    Patch("engine.noise_scale_estimator", "sets", "noise_scale_estimator", "noise_scale.attach_noise_scale",
          "a new attribute on the engine instance (read by noise_scale_stats): must not clash with DeepSpeed's",
          (Anchor(_ENGINE, "DeepSpeedEngine", line=510, absent="noise_scale_estimator"),)),
    Patch("optimizer.step", "wraps", "step", "construction.step_disabled",
          "the client optimizer's step is a no-op inside deepspeed.initialize: the fp16/bf16 wrappers call it once "
          "with zero gradients while being built (it would move weights by weight decay and fill state); DeepSpeed "
          "has no option to skip it",
          (Anchor(_UNFUSED, "FP16_UnfusedOptimizer.initialize_optimizer_states", "self.optimizer.step()", line=425),
           Anchor(_UNFUSED, "FP16_UnfusedOptimizer.__init__", "self.initialize_optimizer_states()", line=108),
           Anchor(_FUSED, "FP16_Optimizer.initialize_optimizer_states", "self.optimizer.step()", line=130),
           Anchor(_FUSED, "FP16_Optimizer.__init__", "self.initialize_optimizer_states()", line=123))),
    Patch("engine.basic_optimizer", "reads", "basic_optimizer", "build.get_spngd",
          "finds SP-NGD behind the engine (the client optimizer as passed); the engine has no public getter",
          (Anchor(_ENGINE, "DeepSpeedEngine._configure_optimizer", "self.basic_optimizer = basic_optimizer",
                  line=2353),)),
    Patch("wrapper.loss_scale", "reads", "loss_scale", "engine.attach",
          "fp16 under ZeRO 1/2: SP-NGD's hooks divide the factor statistics by the current loss scale",
          (Anchor(_ZERO, "DeepSpeedZeroOptimizer", "loss_scale = property(_get_loss_scale, _set_loss_scale)",
                  line=3322),)),
    Patch("param._hp_mapping", "reads", "_hp_mapping", "zero.PartitionedGradients",
          "where this rank's fragment of each parameter sits in its group's flat fp32 partition (param_group_index, "
          "hp_fragment_address, lp_fragment_address: start, numel); DeepSpeed's public safe_get_full_grad & co. are "
          "per-parameter collectives returning full tensors",
          (Anchor(_LINKAGE, "link_hp_params", "lp_param._hp_mapping = get_hp_fragment_mapping(lp_param, lp_start, "
                  "flat_hp_partition, gradient_dict,", line=29),
           Anchor(_FRAGMENT, "tensor_fragment", "lp_fragment_address: fragment_address", line=21),
           Anchor(_FRAGMENT, "tensor_fragment", "hp_fragment_address: fragment_address", line=23),
           Anchor(_FRAGMENT, "tensor_fragment", "param_group_index: int", line=27),
           Anchor(_FRAGMENT, "fragment_address", "numel: int", line=14),
           Anchor(_FRAGMENT, "fragment_address", "start: int", line=15))),
    Patch("wrapper.single_partition_of_fp32_groups", "reads", "single_partition_of_fp32_groups",
          "zero.glue_zero_partitions",
          "write-back: after SP-NGD's deferred step the earlier groups' fp32 partitions are copied into the "
          "low-precision partitions, as DeepSpeed did right after their (no-op) calls; and the re-link",
          (*_ZERO_COPY_BACK, _ZERO_LINK)),
    Patch("wrapper.parallel_partitioned_bit16_groups", "reads", "parallel_partitioned_bit16_groups",
          "zero.glue_zero_partitions", "write-back target (this rank's low-precision partition of each group)",
          _ZERO_COPY_BACK),
    Patch("wrapper.real_dp_process_group", "reads", "real_dp_process_group", "zero.glue_zero_partitions",
          "write-back: this rank's partition index in each group's data-parallel group",
          (Anchor(_ZERO, "DeepSpeedZeroOptimizer.step",
                  "partition_id = dist.get_rank(group=self.real_dp_process_group[i])", line=3077),)),
    Patch("wrapper.bit16_groups", "reads", "bit16_groups", "zero.glue_zero_partitions",
          "re-link: the model parameters of each group, as DeepSpeed's own linking passes them", (_ZERO_LINK,)),
    Patch("deepspeed.utils.lazy_init_hp_params_optimizer_state", "reads", "lazy_init_hp_params_optimizer_state",
          "zero.glue_zero_partitions",
          "DeepSpeed links each parameter's optimizer-state fragment once, after the first group's step() call and "
          "not after a checkpoint load; SP-NGD creates its momentum on the last group's call, so the glue links again "
          "after the first applied step and after each load",
          (Anchor("deepspeed.utils", "lazy_init_hp_params_optimizer_state", line=34,
                  params=("lp_param_list", "flat_hp_partition", "optimizer_state")),
           Anchor(_ZERO, "DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state",
                  "if not self._hp_optimizer_states_linked:", line=853),
           Anchor(_ZERO, "DeepSpeedZeroOptimizer._optimizer_step", "self._lazy_init_hp_params_optimizer_state()",
                  line=2987))),
    Patch("wrapper._optimizer_step", "relies", "_optimizer_step", "zero.PartitionedGradients.begin_step",
          "ZeRO 1/2 with several parameter groups calls step() once per group, param_groups narrowed to that group, "
          "in order, after the overflow check; SP-NGD defers its whole step to the last group's call",
          (Anchor(_ZERO, "DeepSpeedZeroOptimizer._optimizer_step",
                  "self.optimizer.param_groups = [original_param_groups[group_no]]", line=2969),
           Anchor(_ZERO, "DeepSpeedZeroOptimizer.step", "self._optimizer_step(i)", line=3139),
           Anchor(_ZERO, "DeepSpeedZeroOptimizer.step", "self.single_partition_of_fp32_groups[i].grad = None",
                  line=3141))),
    Patch("wrapper._optimizer_step (ZeRO 3)", "relies", "_optimizer_step", "zero_steps.FlatByFlat",
          "ZeRO 3 calls step() once per sub-group, in order, every group kept with params [] except the current "
          "sub-group's group, which holds its flat fp32 partition; SP-NGD defers its whole step to the last call",
          (Anchor(_STAGE3, "DeepSpeedZeroOptimizer_Stage3._optimizer_step",
                  "self.optimizer.param_groups[param_group_id]['params'] = [fp32_param]", line=1260),
           Anchor(_STAGE3, "DeepSpeedZeroOptimizer_Stage3._optimizer_step",
                  "self.optimizer.param_groups[param_group_id]['params'] = []", line=1262),
           Anchor(_STAGE3, "DeepSpeedZeroOptimizer_Stage3.step", "self._optimizer_step(sub_group_id)", line=2921))),
    Patch("wrapper._reassign_or_swap_out_partitioned_parameters", "reads",
          "_reassign_or_swap_out_partitioned_parameters", "zero.glue_zero_partitions",
          "ZeRO 3 write-back: DeepSpeed's own copy of sub-group s's fp32 partition into the low-precision partition "
          "(and the parameters' views of it), redone for the sub-groups stepped before the last one",
          (Anchor(_STAGE3, "DeepSpeedZeroOptimizer_Stage3.step",
                  "self._reassign_or_swap_out_partitioned_parameters(sub_group_id)", line=2924),
           Anchor(_STAGE3, "DeepSpeedZeroOptimizer_Stage3._reassign_or_swap_out_partitioned_parameters",
                  "self.fp16_partitioned_groups_flat[sub_group_id].data.copy_(", line=2858))),
    Patch("wrapper.fp32_partitioned_groups_flat", "reads", "fp32_partitioned_groups_flat", "zero_layout.stage3_layout",
          "ZeRO 3: this rank's flat fp32 partition of every sub-group, the tensors step() is called with",
          (Anchor(_STAGE3, "DeepSpeedZeroOptimizer_Stage3.__init__", "self.fp32_partitioned_groups_flat = []",
                  line=416),)),
    Patch("wrapper.sub_group_to_group_id", "reads", "sub_group_to_group_id", "zero_layout.stage3_layout",
          "ZeRO 3: which parameter group holds each sub-group",
          (Anchor(_STAGE3, "DeepSpeedZeroOptimizer_Stage3._create_fp16_partitions_with_defragmentation",
                  "self.sub_group_to_group_id[sub_group_idx] = fp16_param_groups[param_group_idx].get(", line=953),)),
    Patch("wrapper.grad_position", "reads", "grad_position", "zero_layout.stage3_layout",
          "ZeRO 3: [sub-group, offset in its flat partition, partition numel] per parameter id (get_param_id)",
          (Anchor(_STAGE3, "DeepSpeedZeroOptimizer_Stage3.set_grad_positions",
                  "self.grad_position[param_id] = [int(i), int(current_offset), int(num_elements)]", line=1955),
           Anchor(_STAGE3, "DeepSpeedZeroOptimizer_Stage3.get_param_id", line=1565, params=("param",)))),
    Patch("param.ds_tensor / ds_shape / ds_numel", "reads", "ds_tensor", "zero_layout.stage3_layout",
          "ZeRO 3: a parameter's full shape and element count, and its equal pieces: rank r holds elements "
          "[r·n, min((r+1)·n, ds_numel)) of the flattened parameter, n = ds_tensor.ds_numel; the curvature blocks "
          "read ds_shape by name (curvature.base.full_shape) for models built inside deepspeed.zero.Init",
          (Anchor(_PARTITION, "Init._convert_to_deepspeed_param", "param.ds_shape = param.shape", line=1279),
           Anchor(_PARTITION, "Init._convert_to_deepspeed_param", "param.ds_numel = param.numel()", line=1282),
           Anchor(_PARTITION, "AllGatherCoalescedHandle.wait", "param_start = rank * ds_tensor_numel", line=789))),
    Patch("wrapper.get_grads_for_reduction", "reads", "get_grads_for_reduction", "noise_scale._gradients",
          "under DeepSpeed's BF16_Optimizer the tensors the all-reduce averages are its fp32 accumulation buffers, "
          "which the engine itself fetches this way",
          (Anchor(_BF16, "BF16_Optimizer.get_grads_for_reduction", line=541),
           Anchor(_ENGINE, "DeepSpeedEngine.buffered_allreduce_fallback",
                  'if hasattr(self.optimizer, "get_grads_for_reduction"):', line=3923))),
    Patch("engine.lr_scheduler (AdaptiveWarmup)", "relies", "lr_scheduler", "schedulers.initialize_with_scheduler",
          "AdaptiveWarmup goes in as a callable lr_scheduler=, which DeepSpeed builds on basic_optimizer and steps "
          "inside engine.step() after the optimizer step, not on skipped (overflow) steps; the glue observes the "
          "step's all-reduced loss in its engine.step wrapper before that (also wrapping engine.backward, listed "
          "above): DeepSpeed has no scheduler registry and never shows a scheduler the loss",
          (Anchor(_ENGINE, "DeepSpeedEngine._configure_lr_scheduler",
                  "self.lr_scheduler = self.client_lr_scheduler(self.basic_optimizer)", line=1887),
           Anchor(_ENGINE, "DeepSpeedEngine._take_model_step", "self.lr_scheduler.step(**(lr_kwargs or {}))",
                  line=3545),
           _TAKE_STEP_OVERFLOW)),
)


def problems(patches: tuple[Patch, ...] = PATCHES) -> list[str]:
    """Every anchor the installed DeepSpeed no longer satisfies (empty: all patches still hold)."""
    return [p for patch in patches for p in patch.problems()]
