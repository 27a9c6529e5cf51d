"""The engine seam: SP-NGD glued to a DeepSpeed engine built with it (:func:`attach`, called by
``ds_spngd.initialize``), through SP-NGD's public API only.

What it glues, and through which seam:

* data-parallel group, ZeRO 1/2/3 partitions and gradient accumulation: read from the engine's public API
  (``data_parallel_group``, ``gradient_accumulation_steps()``) and handed to ``spngd.setup_distributed`` /
  ``set_gradient_accumulation_steps``; under ZeRO 1/2/3 the write-back (and at 1/2 the optimizer-state re-link) of
  :mod:`.zero`;
* fp16: SP-NGD's hooks divide by the ZeRO wrapper's current ``loss_scale``;
* forward time (``SPNGD/forward_s``): torch forward hooks on the engine, which is a ``torch.nn.Module`` (a seam: no
  patch; calls of ``engine.forward(...)`` that bypass ``engine(...)`` are not timed);
* ``engine.backward`` (patch): timed (``SPNGD/backward_s``), and ``spngd.begin_backward(boundary)`` before each
  backward; when ``spngd.reduces_gradients`` (``precondition_mode: "reduce_scatter"``) DeepSpeed's gradient
  all-reduce is switched off (``engine.enable_backward_allreduce``, patch);
* ``engine.step`` (patch): a step DeepSpeed skipped (fp16 overflow) drops this step's factor statistics and leaves
  factors, preconditioners, momentum and counters as they were; a skipped step without fp16 (NaN/Inf gradients under
  ZeRO or bf16) raises FloatingPointError (``nonfinite: "raise"``) or counts as SP-NGD's own skip; timings, bytes,
  skip count and memory go to ``engine.monitor`` (public ``write_events``) under ``SPNGD/...``;
* steps SP-NGD skipped itself count as DeepSpeed overflow skips (DeepSpeed counts them and holds the LR scheduler):
  torch's step hooks on SP-NGD (a seam) set the wrapper's ``overflow`` (patch ``wrapper.overflow``);
* checkpoints: :mod:`.checkpoint`.

Every patch is an entry of :data:`.patches.PATCHES`, with the DeepSpeed lines it relies on.
"""

from __future__ import annotations

import time
from typing import Any

from ds_spngd.integrations.deepspeed.checkpoint import attach_checkpoint
from ds_spngd.integrations.deepspeed.zero import StateLinks, glue_zero_partitions, partitioned_gradients
from ds_spngd.optimizer import SPNGD

__all__ = ["attach"]

Times = dict[str, float]


def attach(engine: Any, spngd: SPNGD, fp16: bool = False) -> None:
    """Glue an SP-NGD optimizer to a DeepSpeed engine built with it (see the module docstring)."""
    spngd.set_gradient_accumulation_steps(engine.gradient_accumulation_steps())
    # every parameter: with no Fisher block at all, too
    grads = partitioned_gradients(getattr(engine, "optimizer", None), spngd, spngd.blocks, spngd.model_parameters)
    spngd.setup_distributed(getattr(engine, "data_parallel_group", None), grads)
    links = glue_zero_partitions(getattr(engine, "optimizer", None), spngd, grads)
    if fp16:
        spngd.set_loss_scale_fn(lambda: float(engine.optimizer.loss_scale))
    times: Times = {"forward_s": 0.0, "backward_s": 0.0}
    spngd.engine_times = times
    _time_forward(engine, times)
    _wrap_backward(engine, spngd, times)
    _report_skips_as_overflow(engine, spngd)
    _wrap_step(engine, spngd, fp16, times, links)
    attach_checkpoint(engine, spngd, on_load=links.invalidate if links is not None else None)


def _time_forward(engine: Any, times: Times) -> None:
    """``SPNGD/forward_s``: torch forward hooks on the engine module (pre: start, post: add; also when forward
    raises)."""
    started: list[float] = []

    def start(module: Any, args: Any) -> None:
        started.append(time.perf_counter())

    def stop(module: Any, args: Any, output: Any) -> None:
        if started:
            times["forward_s"] += time.perf_counter() - started.pop()

    engine.register_forward_pre_hook(start, prepend=True)
    engine.register_forward_hook(stop, always_call=True)


def _wrap_backward(engine: Any, spngd: SPNGD, times: Times) -> None:
    """Patches ``engine.backward`` (timing; ``spngd.begin_backward``) and, when SP-NGD reduces the gradients itself,
    ``engine.enable_backward_allreduce``."""
    if spngd.reduces_gradients:  # precondition_mode "reduce_scatter": DeepSpeed's all-reduce must be off
        engine.enable_backward_allreduce = False
    plain_backward = engine.backward

    def backward(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:  # SP-NGD's gradient hooks act only in the backward that ends the accumulation cycle
            spngd.begin_backward(bool(engine.is_gradient_accumulation_boundary()))
            return plain_backward(*a, **k)
        finally:
            times["backward_s"] += time.perf_counter() - t0

    engine.backward = backward


def _wrap_step(engine: Any, spngd: SPNGD, fp16: bool, times: Times, links: StateLinks | None) -> None:
    """Patches ``engine.step``: after each accumulation-boundary step, the bookkeeping of the module docstring."""
    orig_step = engine.step

    def step(*a: Any, **k: Any) -> Any:
        boundary = engine.is_gradient_accumulation_boundary()
        before = (spngd.steps, spngd.skipped_steps)
        out = orig_step(*a, **k)
        if not boundary:
            return out
        if links is not None:
            links.after_step(applied=spngd.steps != before[0])
        if (spngd.steps, spngd.skipped_steps) == before:  # DeepSpeed skipped the optimizer step itself
            _deepspeed_skipped(engine, spngd, fp16)
        _write_events(engine, spngd, times)
        times["forward_s"] = times["backward_s"] = 0.0
        return out

    engine.step = step


def _deepspeed_skipped(engine: Any, spngd: SPNGD, fp16: bool) -> None:
    """DeepSpeed did not call SP-NGD's step: forget this step's statistics; outside fp16 loss scaling (where the skip
    is routine) DeepSpeed skipped for NaN/Inf gradient norms (ZeRO, bf16): raise or count it per ``nonfinite``."""
    spngd.discard_step()
    if fp16:
        return
    reason = (f"DeepSpeed skipped optimizer step {engine.global_steps}: the gradient norm is NaN/Inf; "
              "no parameter was updated")
    if spngd.cfg.nonfinite == "raise":
        raise FloatingPointError(reason)
    spngd.note_skipped(reason)


def _report_skips_as_overflow(engine: Any, spngd: SPNGD) -> None:
    """A step SP-NGD skipped (``nonfinite: "skip"``) must look to the engine like an fp16 overflow skip: it counts
    ``skipped_steps`` and holds the LR scheduler when ``engine.optimizer.overflow`` is true after the step. At stage
    0 fp32 the engine's optimizer is SP-NGD itself (its ``overflow``); DeepSpeed's wrappers (ZeRO, bf16/fp16) reset
    their own ``overflow`` at the start of their step, so torch step hooks on SP-NGD set it after SP-NGD's step (under
    ZeRO 1/2/3 with several groups / sub-groups: after each call; SP-NGD's step runs on the last one)."""
    wrapper = getattr(engine, "optimizer", None)
    if wrapper is spngd or wrapper is None:
        return

    def before(optimizer: Any, args: Any, kwargs: Any) -> None:
        spngd.overflow = False

    def after(optimizer: Any, args: Any, kwargs: Any) -> None:
        if spngd.overflow:
            wrapper.overflow = True

    spngd.register_step_pre_hook(before)
    spngd.register_step_post_hook(after)


def _write_events(engine: Any, spngd: SPNGD, times: Times) -> None:
    """Timings, bytes, skip counts and this rank's memory (``SPNGD/memory_<category>_bytes``) to the monitor."""
    monitor = getattr(engine, "monitor", None)
    if monitor is None or not getattr(monitor, "enabled", False):
        return
    values = {**times, **spngd.last_stats, "skipped_steps": float(spngd.skipped_steps)}
    values.update({f"memory_{k}_bytes": float(v) for k, v in spngd.memory_usage().items()})
    monitor.write_events([(f"SPNGD/{k}", float(v), engine.global_samples) for k, v in sorted(values.items())])
