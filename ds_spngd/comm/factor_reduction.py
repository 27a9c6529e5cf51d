"""Bucketed, asynchronous reduction of the curvature factors to the ranks that own them (SP-NGD, Osawa et al.
arXiv:1811.12019 §4.2: factors travel as packed upper triangles in half precision, overlapped with the backward pass,
to the one rank that inverts them).

Per factor-refresh step:

1. every ``SymmetricFactor.add`` notifies the reducer; once a factor has received as many contributions as on the
   first refresh step (the last micro-batch's A after that layer's forward, its G during that layer's backward) it
   is *final*;
2. buckets are launched strictly in their planned order, each as soon as it and every earlier bucket are final: the
   bucket's factors are packed (upper triangle of the local per-example mean, cast to ``comm_dtype``) into one
   buffer and ``reduce``d asynchronously to the bucket's owner rank;
3. :meth:`FactorReducer.complete` (from ``optimizer.step``) launches what is left and waits on the handles; it
   returns this rank's flags for the step's agreement (:mod:`ds_spngd.comm.agreement`): which factors it
   contributed to, which got contributions after their bucket had left, and — on owners — which reduced sums are
   NaN/Inf. Nothing is raised here: a fault seen by one rank must end the step the same way on every rank;
4. once every rank agreed, :meth:`FactorReducer.commit` lets each owner commit Σ_r mean_r / (number of contributing
   ranks) — the mean of the ranks' per-example means, which is the global per-example mean whenever the ranks see
   equally many examples (DeepSpeed's contract: the same micro-batch size on every rank; its gradient average is the
   same mean of rank means); a layer whose hooks fired on some ranks only gets the mean over those ranks.
   Non-owners only advance the factors' versions. :meth:`rollback` / :meth:`settle` undo or finalize the commit.

Collective order is identical on every rank by construction: the bucket plan depends only on the blocks (module
order), their owners, the cap and the step's due set (:meth:`FactorReducer.set_due`: with ``stale_statistics`` only
the factors due this step are planned, in the same readiness order; the due set is agreed by every rank,
:mod:`ds_spngd.staleness`), buckets are launched in plan order, and they travel on SP-NGD's private
communicator (:func:`ds_spngd.comm.collectives.private_group`), so readiness only decides *when*, never the order.
Gradient accumulation adds locally; the reduction happens once per optimizer step. Buffers are packed on the
factors' device.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ds_spngd.comm.agreement import max_abs
from ds_spngd.comm.collectives import rank, reduce_sum, wait_all, world_size
from ds_spngd.comm.packing import pack_symmetric, unpack_symmetric
from ds_spngd.curvature.factor import SymmetricFactor

__all__ = ["Bucket", "bucket_groups", "plan_buckets", "FactorReducer", "factor_traffic_bytes", "COMM_DTYPES"]

COMM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PLAN_CACHE = 32  # bucket plans kept per reducer (one per distinct due set; the all-factors plan is never evicted)


@dataclass(eq=False)
class Bucket:
    """Factors reduced together: one owner, one packed buffer, one collective.

    Attributes:
        owner: group rank that receives the sum.
        factors: in packing order.
        numel: payload length Σ B·d(d+1)/2.
    """

    owner: int
    factors: list[SymmetricFactor] = field(default_factory=list)
    numel: int = 0


def bucket_groups(sizes: Sequence[int], owners: Sequence[int], cap_numel: int) -> list[tuple[int, list[int]]]:
    """Group items (given in expected readiness order) into per-owner buckets of at most ``cap_numel`` elements.

    One bucket per owner is open at a time; it closes when full (or when the next item would overflow it). An item
    larger than the cap travels alone. Buckets come in the order their last item is expected to be ready (the
    factors here, the gradient buckets of :mod:`ds_spngd.comm.grad_reduction`).

    Returns:
        (owner, item positions) per bucket, in launch order; every item appears in exactly one.

    Raises:
        ValueError: ``cap_numel`` < 1, or not one owner per item.
    """
    if cap_numel < 1:
        raise ValueError(f"bucket capacity must be at least 1 element, got {cap_numel}")
    if len(sizes) != len(owners):
        raise ValueError(f"{len(sizes)} items but {len(owners)} owners")
    done: list[tuple[int, int, list[int]]] = []  # (position of the last item, owner, items)
    open_: dict[int, tuple[int, int, list[int]]] = {}  # owner → (last position, numel, items)
    for pos, (n, o) in enumerate(zip(sizes, owners, strict=True)):
        last, numel, items = open_.pop(o, (pos, 0, []))
        if items and numel + n > cap_numel:
            done.append((last, o, items))
            numel, items = 0, []
        items.append(pos)
        numel += n
        if numel >= cap_numel:
            done.append((pos, o, items))
        else:
            open_[o] = (pos, numel, items)
    done += [(last, o, items) for o, (last, _, items) in open_.items()]
    return [(o, items) for _, o, items in sorted(done, key=lambda t: t[0])]


def plan_buckets(factors: Sequence[SymmetricFactor], owners: Sequence[int], cap_numel: int) -> list[Bucket]:
    """Group factors (given in expected readiness order) into per-owner buckets of at most ``cap_numel`` values
    (:func:`bucket_groups` on their packed sizes).

    Returns:
        The buckets in launch order; every factor appears in exactly one.
    """
    return [Bucket(o, [factors[i] for i in items], sum(factors[i].packed_numel for i in items))
            for o, items in bucket_groups([f.packed_numel for f in factors], owners, cap_numel)]


def factor_traffic_bytes(factors: Sequence[SymmetricFactor], dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """(packed payload bytes, dense fp32 bytes): what one refresh hands to collectives per rank, packed upper
    triangles in ``dtype`` vs every factor as a full d×d fp32 matrix (the baseline of a dense all-reduce)."""
    size = torch.empty(0, dtype=dtype).element_size()
    packed = sum(f.packed_numel for f in factors) * size
    dense = sum(f.blocks * f.dim * f.dim for f in factors) * 4
    return packed, dense


class FactorReducer:
    """Owns the factor reduction schedule of one optimizer (see the module docstring).

    Args:
        factors: every factor of every block.
        owners: owner group rank of each factor (its block's inversion owner).
        group: SP-NGD's process group (None = world).
        comm_dtype: payload dtype (fp32, bf16 or fp16).
        bucket_cap_bytes: payload bytes per bucket (a larger factor travels alone).
        overlap: launch buckets from the hooks as soon as they are final (else all at :meth:`complete`).

    Attributes:
        stats: figures of the last :meth:`complete` — ``payload_bytes``, ``dense_bytes`` (dense fp32 all-reduce
            equivalent), ``buckets``, ``buckets_early`` (launched before the step), ``wait_s`` (time blocked on the
            handles inside the step), ``launch_s`` (packing + launching, partly inside the hooks).
    """

    def __init__(self, factors: Sequence[SymmetricFactor], owners: Sequence[int], group: Any = None,
                 comm_dtype: torch.dtype = torch.float32, bucket_cap_bytes: int = 4 << 20,
                 overlap: bool = True) -> None:
        if comm_dtype not in COMM_DTYPES.values():
            raise ValueError(f"unsupported factor comm dtype {comm_dtype}; use one of {list(COMM_DTYPES)}")
        fwd = [i for i, f in enumerate(factors) if f.final_in == "forward"]
        bwd = [i for i, f in enumerate(factors) if f.final_in != "forward"][::-1]
        order = fwd + bwd  # A in forward (module) order, then G / unit-wise factors in backward order
        self.group = group
        self.dtype = comm_dtype
        self.overlap = overlap
        self.factors = list(factors)
        # keyed by factor name (unique per model; survives copy.deepcopy of a model whose hooks reach the factors)
        if len({f.name for f in factors}) != len(factors):
            raise ValueError("factor names must be unique")
        elem = torch.empty(0, dtype=comm_dtype, device="cpu").element_size()
        self._order, self._owner_list = order, list(owners)
        self._cap = max(1, bucket_cap_bytes // elem)
        self._plans: dict[tuple[bool, ...] | None, tuple[list[Bucket], dict[str, int], tuple[int, int]]] = {}
        self._due: tuple[bool, ...] | None = None
        self.buckets, self._bucket_of, self._traffic = self._plan(None)
        self.all_buckets = self.buckets  # the plan of a step that refreshes every factor (memory planning)
        self._expected: dict[str, int] | None = None  # contributions per factor and step, learned at the 1st refresh
        self._totals: dict[str, Tensor] = {}
        self._had: dict[str, float | Tensor] = {}
        self._last_adds: dict[str, int] = {}
        self._reset()
        self.stats: dict[str, float] = {}
        for f in self.factors:
            f.on_add = self.notify

    def _plan(self, due: tuple[bool, ...] | None) -> tuple[list[Bucket], dict[str, int], tuple[int, int]]:
        """(buckets, factor name → bucket index, traffic) of the factors in ``due`` (None = all), cached."""
        if due not in self._plans:
            if len(self._plans) >= PLAN_CACHE:  # stale statistics make many due sets: keep the recent ones
                oldest = next(k for k in self._plans if k is not None)
                del self._plans[oldest]
            keep = [i for i in self._order if due is None or due[i]]
            buckets = plan_buckets([self.factors[i] for i in keep], [self._owner_list[i] for i in keep], self._cap)
            bucket_of = {f.name: k for k, b in enumerate(buckets) for f in b.factors}
            traffic = factor_traffic_bytes([f for b in buckets for f in b.factors], self.dtype)
            self._plans[due] = (buckets, bucket_of, traffic)
        return self._plans[due]

    @property
    def cached_due_sets(self) -> list[tuple[bool, ...] | None]:
        """The due sets whose bucket plans are cached (None: every factor; at most ``PLAN_CACHE``)."""
        return list(self._plans)

    def set_due(self, due: Sequence[bool] | None) -> None:
        """Reduce only the factors marked in ``due`` (:attr:`factors` order; None = every factor) from the next
        refresh on. The mask must be identical on every rank (it decides the buckets and so the collectives).

        Raises:
            RuntimeError: buckets of the current step are in flight.
            ValueError: ``due`` does not have one entry per factor.
        """
        key = None if due is None or all(due) else tuple(bool(d) for d in due)
        if key is not None and len(key) != len(self.factors):
            raise ValueError(f"due mask of {len(key)} entries for {len(self.factors)} factors")
        if key == self._due:
            return
        if self._flights or any(self._adds.values()):
            raise RuntimeError("the due set cannot change while a step's factor reduction is under way")
        self._due = key
        self.buckets, self._bucket_of, self._traffic = self._plan(key)
        self._reset()

    def owned_totals(self) -> dict[str, Tensor]:
        """Factor name → reduced sum Σ_r mean_r held by this rank (its owned factors of the completed step)."""
        return self._totals

    def _reset(self) -> None:
        self._adds: dict[str, int] = {f.name: 0 for f in self.factors}
        self._late: dict[str, int] = {}
        self._final: list[int] = [0] * len(self.buckets)  # final factors per bucket
        self._next = 0
        self._flights: list[tuple[Tensor, Any, list[float | Tensor]]] = []
        self._launch_s = 0.0
        self._early = 0

    # ---- launching ----------------------------------------------------------------------------------------------
    def notify(self, f: SymmetricFactor) -> None:
        """A contribution was added to ``f`` (called by :meth:`SymmetricFactor.add`, i.e. from a module hook).

        Never raises: a contribution that arrives after its factor's bucket left is recorded and reported by
        :meth:`complete` to the step's agreement, so every rank stops at the same point.
        """
        key = f.name
        self._adds[key] += 1
        if self._expected is None or not self.overlap or key not in self._bucket_of:
            return  # (a factor outside the due set: its contribution is dropped at complete())
        k = self._bucket_of[key]
        if k < self._next:
            self._late[key] = self._late.get(key, 0) + 1
            return
        if self._adds[key] == self._expected.get(key, -1):
            self._final[k] += 1
            while self._next < len(self.buckets) and self._final[self._next] == len(self.buckets[self._next].factors):
                self._launch(self._next)
                self._early += 1

    def _launch(self, k: int) -> None:
        t0 = time.perf_counter()
        bucket = self.buckets[k]
        means: list[Tensor] = []
        had: list[float | Tensor] = []
        for f in bucket.factors:
            total, count = f.take_local()
            if isinstance(count, Tensor):  # a data-dependent count (masked positions): no host sync
                means.append(total / count.clamp_min(1.0))
                had.append((count > 0).float())
            else:
                means.append(total / count if count > 0 else total)
                had.append(1.0 if count > 0 else 0.0)
        buf = pack_symmetric(means, dtype=self.dtype)
        handle = reduce_sum(buf, bucket.owner, self.group, async_op=True)
        self._flights.append((buf, handle, had))
        self._next = k + 1
        self._launch_s += time.perf_counter() - t0

    # ---- the step -----------------------------------------------------------------------------------------------
    def complete(self) -> tuple[Tensor, Tensor, Tensor]:
        """Launch the remaining buckets, wait for all of them and unpack the owners' sums (no host sync).

        Returns:
            Three float vectors over :attr:`factors` (their order), on the factors' device, for the agreement:
            ``had`` (1 where this rank contributed), ``late`` (contributions that arrived after the factor's bucket
            had left) and ``bad`` (1 where this rank owns the factor and the reduced sum is NaN/Inf).
        """
        while self._next < len(self.buckets):
            self._launch(self._next)
        me, world = rank(self.group), world_size(self.group)
        t0 = time.perf_counter()
        wait_all(h for _, h, _ in self._flights)
        wait_s = time.perf_counter() - t0
        self._totals, self._had = {}, {}
        for bucket, (buf, _, had) in zip(self.buckets, self._flights, strict=True):
            self._had.update({f.name: h for f, h in zip(bucket.factors, had, strict=True)})
            if world == 1 or bucket.owner == me:
                totals = unpack_symmetric(buf, [(f.blocks, f.dim) for f in bucket.factors])
                self._totals.update({f.name: t for f, t in zip(bucket.factors, totals, strict=True)})
        had_v, late_v, bad = self._flag_vectors()
        payload, dense = self._traffic
        self.stats = {"payload_bytes": float(payload if world > 1 else 0), "dense_bytes": float(dense),
                      "buckets": float(len(self.buckets)), "buckets_early": float(self._early),
                      "wait_s": wait_s, "launch_s": self._launch_s}
        for f in self.factors:  # contributions that arrived after their bucket left belong to no step
            if f.accum is not None:
                f.take_local()
        self._last_adds = dict(self._adds)
        self._reset()
        return had_v, late_v, bad

    def _flag_vectors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``had``, ``late`` and ``bad`` of :meth:`complete`, assembled on the factors' device from device scalars:
        no host → device upload (on CUDA each one is a stream sync) unless a contribution arrived late."""
        device = self.factors[0].device if self.factors else torch.device("cpu")
        zero, one = torch.zeros((), device=device), torch.ones((), device=device)

        def scalar(h: float | Tensor) -> Tensor:
            if isinstance(h, Tensor):
                return h.to(device=device, dtype=torch.float32).reshape(())
            return one if h == 1.0 else zero if h == 0.0 else torch.full((), h, device=device)

        had = torch.stack([scalar(self._had.get(f.name, 0.0)) for f in self.factors]) if self.factors else \
            torch.zeros(0, device=device)
        # max-abs norm of the owned sums: NaN/Inf exactly when an entry is (a sum of squares could overflow)
        norms = dict(zip(self._totals, max_abs(list(self._totals.values())), strict=True))
        bad = (~torch.isfinite(torch.stack([norms.get(f.name, zero) for f in self.factors]))).float() \
            if self.factors else torch.zeros(0, device=device)
        late = torch.zeros(len(self.factors), device=device) if not self._late else torch.tensor(
            [float(self._late.get(f.name, 0)) for f in self.factors], dtype=torch.float32, device=device)
        return had, late, bad

    def commit(self, contributors: Sequence[float], decay: float) -> None:
        """Commit the completed step (after every rank agreed): owners fold Σ_r mean_r / #contributors into their
        factors, others advance the versions. Provisional until :meth:`settle` (or undone by :meth:`rollback`).

        Args:
            contributors: per factor (:attr:`factors` order), the number of ranks that contributed (the reduced
                ``had`` of :meth:`complete`).
            decay: running-average decay for :meth:`SymmetricFactor.commit`.
        """
        for f, n in zip(self.factors, contributors, strict=True):
            if f.name in self._totals:
                f.commit(self._totals[f.name], n, decay)
            else:
                f.mark_committed(n > 0)
        if self._expected is None:  # contributions per step, learned from the first committed refresh
            self._expected = {k: v for k, v in self._last_adds.items() if v > 0}
        self._totals = {}

    def rollback(self) -> None:
        """Undo :meth:`commit` (a later part of the step failed on some rank)."""
        for f in self.factors:
            f.rollback()

    def settle(self) -> None:
        """Make :meth:`commit` final."""
        for f in self.factors:
            f.settle()

    def discard(self) -> None:
        """Drop this step's statistics (a skipped step): pending buckets still complete so ranks stay aligned."""
        self.complete()
        self._totals = {}

    @property
    def in_flight(self) -> bool:
        """True when buckets were launched since the last :meth:`complete`."""
        return bool(self._flights)

    @property
    def launch_seconds(self) -> float:
        """Seconds spent packing and launching buckets since the last :meth:`complete` (read before the step: the
        share spent inside the module hooks; benchmarks/step_phases.py)."""
        return self._launch_s

    def adopt_counts(self, other: FactorReducer) -> None:
        """Take over the contributions ``other`` counted (re-planning before the first step; same factors)."""
        self._adds = {k: other._adds.get(k, 0) for k in self._adds}

    def buffer_bytes(self) -> int:
        """Bytes of the packed buckets in flight now (payloads and the owners' unpacked sums)."""
        held = sum(buf.numel() * buf.element_size() for buf, _, _ in self._flights)
        return held + sum(t.numel() * t.element_size() for t in self._totals.values())
