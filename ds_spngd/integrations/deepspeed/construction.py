"""The client optimizer's ``step()`` is a no-op while DeepSpeed builds its wrappers around it.

DeepSpeed 0.19.8's fp16 / bf16 wrappers (``FP16_UnfusedOptimizer``, ``FP16_Optimizer``) call the client optimizer's
``step()`` once from their constructor, with zero gradients, to create its state
(:data:`ds_spngd.integrations.deepspeed.patches.PATCHES` ``optimizer.step``). For SP-NGD that step would run the
whole update on zero gradients; for LARS with weight decay it moves the weights. DeepSpeed has no option to skip it, so
both routes of ``ds_spngd.initialize`` (SP-NGD, :mod:`.build`; LARS / Lamb, :mod:`.first_order`) wrap
``deepspeed.initialize`` in :func:`step_disabled`, which works for any ``torch.optim.Optimizer`` and needs nothing from
the optimizer itself.

Imports no DeepSpeed.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["step_disabled"]


@contextlib.contextmanager
def step_disabled(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Within the block, ``optimizer.step(...)`` returns None without running (the class's step, its torch step hooks
    and the closure are not called); afterwards it is the optimizer's own step again.

    The gate is a bound method set on the instance. On exit it is removed, unless something wrapped it on the instance
    meanwhile (a torch LR scheduler built on this optimizer inside ``deepspeed.initialize`` wraps ``optimizer.step``
    to track calls): then the gate stays under that wrapper and passes every call through to the optimizer's step.
    """
    own = vars(optimizer)
    previous = own.get("step")  # an instance-level step that was there before (None: the class's)
    closed = [True]

    def gate(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        if closed[0]:
            return None
        step = previous if previous is not None else type(self).step.__get__(self)
        return step(*args, **kwargs)

    bound = types.MethodType(gate, optimizer)
    setattr(optimizer, "step", bound)  # noqa: B010 - an instance attribute (mypy rejects assigning to a method)
    try:
        yield
    finally:
        closed[0] = False
        if own.get("step") is bound:
            if previous is None:
                delattr(optimizer, "step")
            else:
                setattr(optimizer, "step", previous)  # noqa: B010
