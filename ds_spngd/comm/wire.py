"""Bytes on the wire: every ``torch.distributed`` collective a process issues — SP-NGD's and DeepSpeed's own (its
``deepspeed.comm`` calls ``torch.distributed`` for training collectives) — recorded with its payload, and the
bytes each rank sends for it under the bandwidth-optimal ring / pipelined algorithms (Thakur, Rabenseifner & Gropp
2005; Patarasuk & Yuan 2009):

=========================  ============================  ==================================================
collective                 payload n (bytes)             bytes sent per rank, W ranks
=========================  ============================  ==================================================
all_reduce                 the tensor                    2 (W − 1)/W · n  (reduce-scatter + all-gather)
reduce                     the tensor                    (W − 1)/W · n    (a reduce-scatter to the root)
broadcast                  the tensor                    (W − 1)/W · n    (scatter + all-gather, amortized)
all_gather(_into_tensor)   the *output* (W shares)       (W − 1)/W · n    (also all_gather_single)
reduce_scatter(_tensor)    the *input* (W shares)        (W − 1)/W · n    (also reduce_scatter_single)
=========================  ============================  ==================================================

So one all-reduce of P bytes and a reduce of P to owners plus a broadcast of P from them cost the same, 2(W−1)/W·P:
the comparison SP-NGD's ``reduce_scatter`` mode (Osawa et al. arXiv:1811.12019 §4) is about. What a backend
really sends can differ (gloo's reduce-scatter is an all-reduce, DeepSpeed's CPU inference all-reduce goes through
shared memory): :class:`CollectiveLog` reports the payloads as well.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["CollectiveLog", "ring_bytes", "record_collectives"]

KINDS = ("all_reduce", "reduce", "broadcast", "all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor",
         "reduce_scatter_single", "all_gather", "reduce_scatter")


def ring_bytes(kind: str, payload: float, world: int) -> float:
    """Bytes one rank sends for a collective of ``payload`` bytes over ``world`` ranks (module table).

    Raises:
        ValueError: an unknown collective kind.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown collective {kind!r}")
    if world <= 1:
        return 0.0
    share = (world - 1) / world * payload
    return 2.0 * share if kind == "all_reduce" else share


def _payload(kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    first = args[0] if args else next(iter(kwargs.values()), None)
    if kind in ("all_gather", "reduce_scatter"):  # (list of outputs, input) / (output, list of inputs)
        tensors = first if kind == "all_gather" else (args[1] if len(args) > 1 else kwargs.get("input_list"))
        return sum(t.numel() * t.element_size() for t in (tensors or []))
    if kind in ("reduce_scatter_tensor", "reduce_scatter_single"):  # (output, input)
        first = args[1] if len(args) > 1 else kwargs.get("input", first)
    return int(first.numel() * first.element_size()) if isinstance(first, torch.Tensor) else 0


@dataclass
class CollectiveLog:
    """What :func:`record_collectives` saw: one (kind, payload bytes, group size) per call, in issue order."""

    calls: list[tuple[str, int, int]] = field(default_factory=list)

    def payload_bytes(self) -> int:
        """Σ payloads."""
        return sum(n for _, n, _ in self.calls)

    def wire_bytes(self) -> float:
        """Σ bytes sent per rank under the ring model (:func:`ring_bytes`)."""
        return sum(ring_bytes(k, n, w) for k, n, w in self.calls)

    def clear(self) -> None:
        self.calls.clear()


@contextmanager
def record_collectives() -> Iterator[CollectiveLog]:
    """Patch the ``torch.distributed`` collectives (:data:`KINDS`) to log every call while the context is open."""
    log = CollectiveLog()
    originals = {k: getattr(dist, k) for k in KINDS if hasattr(dist, k)}

    def wrap(kind: str, real: Any) -> Any:
        def logged(*args: Any, **kwargs: Any) -> Any:
            group = kwargs.get("group")
            log.calls.append((kind, _payload(kind, args, kwargs), dist.get_world_size(group)))
            return real(*args, **kwargs)

        return logged

    for k, real in originals.items():
        setattr(dist, k, wrap(k, real))
    try:
        yield log
    finally:
        for k, real in originals.items():
            setattr(dist, k, real)
