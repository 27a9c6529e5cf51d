"""Decisions every rank takes together: one reduced status vector per step, so a fault on one rank ends the step the
same way on every rank (an error naming the layer, or a skipped step) instead of a hang.

Anything that can go wrong between SP-NGD's matched collectives is first written as a number into a small vector
whose layout is identical on every rank, the vector is SUM-all-reduced once, and every rank reads the same sums
(one host sync). The places that feed it:

* factor statistics: per factor, whether this rank contributed, how many contributions arrived after its bucket had
  left (a contribution mismatch), and — on the factor's owner — whether the reduced sum is NaN/Inf (one rank's
  overflowing statistics reach the owner through the reduction);
* gradients: per parameter (stage 0) or per block fragment (ZeRO 1/2), whether it is NaN/Inf;
* inversions (a second vector, on inversion steps only): per block, whether its owner failed to build the
  preconditioner (:data:`INVERSION_FAILURES` gives the codes).

The step then continues, raises the same error on every rank, or skips on every rank (``nonfinite`` in the JSON).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ds_spngd.comm.collectives import all_reduce_sum

__all__ = ["agree", "max_abs", "Problem", "StepFailure", "INVERSION_FAILURES", "describe_problems", "input_problems"]

#: failure codes an owner writes for a block whose preconditioner it could not build (index = code)
INVERSION_FAILURES = (
    "",
    "the solver failed (eigendecomposition did not converge)",
    "the preconditioner came out non-finite (factor too ill-conditioned for fp32 at this damping)",
    "an unexpected error on the owner rank (its log has the traceback)",
)


def agree(parts: Sequence[Tensor], group: Any, device: torch.device) -> list[float]:
    """SUM-all-reduce the concatenation of ``parts`` over ``group`` and return it as Python floats.

    One collective and one host sync whatever the number of parts (each a 1-D float tensor on ``device``; the
    layout must be identical on every rank).
    """
    flat = torch.cat([p.reshape(-1).to(device=device, dtype=torch.float32) for p in parts]) if parts else \
        torch.zeros(0, device=device)
    all_reduce_sum(flat, group)
    return flat.tolist()  # type: ignore[no-any-return]


def max_abs(tensors: Sequence[Tensor]) -> list[Tensor]:
    """max |x| of each tensor — its infinity norm, bit for bit — as a 0-d tensor on the tensor's device, without a host
    sync: NaN/Inf exactly when an entry is (a sum of squares could overflow on finite values), which is what the
    step's NaN/Inf flags test.

    On CUDA one fused ``torch._foreach_norm(·, inf)``; elsewhere ``torch.aminmax`` per tensor and the larger absolute
    extreme: the CPU's infinity-norm kernel is ~50× slower (6.9 ms vs 0.13 ms for 1.1 M fp32 values; this was most of
    the agreement's time in benchmarks/step_phases.py), and aminmax allocates nothing of the tensor's size.

    Raises:
        RuntimeError: an empty tensor (it has no maximum), as ``torch._foreach_norm`` does.
    """
    if all(t.is_cuda for t in tensors):
        return list(torch._foreach_norm(list(tensors), float("inf"))) if tensors else []
    out = []
    for t in tensors:
        lo, hi = torch.aminmax(t)
        out.append(torch.maximum(lo.abs(), hi.abs()))
    return out


@dataclass(frozen=True)
class Problem:
    """One thing that went wrong in a step, as every rank sees it.

    Attributes:
        subject: what it concerns (a factor, parameter or block name).
        what: the problem, in words.
        numerical: True for NaN/Inf and solver failures (``nonfinite: "skip"`` may skip the step); False for
            structural problems (a contribution mismatch), which always raise.
    """

    subject: str
    what: str
    numerical: bool = True


def describe_problems(step: int, problems: Sequence[Problem], limit: int = 8) -> str:
    """One message for a list of problems: subjects grouped by what went wrong (at most ``limit`` named per group,
    the rest counted). Identical on every rank for identical inputs."""
    groups: dict[str, list[str]] = {}
    for p in problems:
        groups.setdefault(p.what, []).append(p.subject)
    parts = []
    for what, subjects in groups.items():
        more = f" and {len(subjects) - limit} more" if len(subjects) > limit else ""
        parts.append(f"{', '.join(subjects[:limit])}{more}: {what}")
    return f"SP-NGD step {step}: " + "; ".join(parts)


class StepFailure(RuntimeError):
    """Internal: carries the agreed problems of a step to the code that raises or skips (never escapes SP-NGD)."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__("; ".join(f"{p.subject}: {p.what}" for p in problems))
        self.problems = list(problems)


def input_problems(factor_names: Sequence[str], late: Sequence[float], bad: Sequence[float],
                   grad_names: Sequence[str], grads: Sequence[float], fp16_payload: bool) -> list[Problem]:
    """The problems of a step's agreed input sums (identical on every rank, so every rank builds the same list).

    Args:
        factor_names: the factors reduced this step, in the vector's order.
        late: per factor, contributions that arrived after its bucket was sent (summed over ranks).
        bad: per factor, 1 when its reduced value is NaN/Inf (written by its owner).
        grad_names: the gradient entries of the vector (parameters, or block fragments under ZeRO 1/2).
        grads: per entry, the number of ranks that saw NaN/Inf.
        fp16_payload: the factors travelled in fp16 (adds the overflow hint).
    """
    problems = [Problem(name, f"{int(k)} contribution(s) arrived after its bucket was sent (the layer ran more "
                        "often this step than on the first refresh step); set overlap_comm=false for models "
                        "whose layers run a varying number of times per step", numerical=False)
                for name, k in zip(factor_names, late, strict=True) if k]
    hint = " — fp16 factor payloads overflow above 65504: use comm_dtype bf16" if fp16_payload else ""
    problems += [Problem(name, "NaN/Inf in the reduced factor statistics (the layer's inputs or output gradients "
                         f"overflowed on at least one rank){hint}")
                 for name, k in zip(factor_names, bad, strict=True) if k]
    problems += [Problem(name, f"gradient holds NaN/Inf (seen on {int(k)} rank(s))")
                 for name, k in zip(grad_names, grads, strict=True) if k]
    return problems
