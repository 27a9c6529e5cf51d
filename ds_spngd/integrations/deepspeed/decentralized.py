"""Decentralized momentum SGD: DmSGD and DecentLaM (Yuan et al., "DecentLaM: Decentralized Momentum SGD for
Large-batch Deep Training", ICCV 2021, arXiv:2104.11981), as ``torch.optim.Optimizer`` classes that average with
their neighbours on a sparse topology (point-to-point ``isend`` / ``irecv``) instead of all-reducing gradients.

Notation of the paper: rank (node) ``i`` of ``n`` holds its own parameters ``x_i`` (replicas are *not* identical),
momentum ``m_i``, its local stochastic gradient ``g_i = ∇F(x_i; ξ_i)``; ``γ`` is the learning rate, ``β`` the
momentum, ``W = [w_ij]`` the mixing matrix (``w_ij > 0`` only when ``j`` is ``i`` or one of its in-neighbours).
Weight decay λ is L2 added to the gradient, as in ``torch.optim.SGD``: ``g_i ← g_i + λ x_i``.

**DmSGD** (the paper's decentralized momentum SGD baseline, adapt-then-combine form, its eq. (3))::

    m_i ← β m_i + g_i
    x_i ← Σ_j w_ij (x_j − γ m_j)

**DecentLaM** (the paper's Algorithm 1, the bias-removed recursion of its Sec. 4)::

    g̃_i = (1/γ) (x_i − Σ_j w_ij (x_j − γ g_j))        (the "modified gradient")
    m_i ← β m_i + g̃_i
    x_i ← x_i − γ m_i

Both exchange one vector per step (DmSGD ``x_j − γ m_j``, DecentLaM ``x_j − γ g_j``). In stacked form DecentLaM is
``x ← W x − γ (β m + W g)``, DmSGD ``x ← W x − γ W (β m + g)``: DmSGD mixes the momentum, which carries the
inconsistency (heterogeneity) bias forward and amplifies it by ~1/(1 − β); DecentLaM keeps the momentum local and
corrects it with the consensus residual ``(x_i − Σ_j w_ij x_j)/γ``. The two agree for the first two steps from
identical replicas and differ from the third on (unless ``W`` is the complete graph ``J/n``, where both equal
all-reduce momentum SGD, ``torch.optim.SGD`` on the averaged gradient).

Caveat on the citations: the paper's text could not be retrieved when this was written, so "eq. (3)" and
"Algorithm 1" are quoted from memory of the arXiv version and should be checked against it; the recursions themselves
were cross-checked against a public re-implementation (the DecentLaM and gossip/DSGDm optimizers of Takezawa et al.'s
Momentum Tracking code, TMLR 2023), which uses exactly these updates.

A learning rate of exactly 0 (a linear warm-up's first step) leaves DecentLaM's ``(x_i − Σ_j w_ij x_j)/γ``
undefined; such a step exchanges ``[x_i, g_i]`` instead and applies the γ → 0 limit of the update:
``x_i ← Σ_j w_ij x_j``, ``m_i ← β m_i + Σ_j w_ij g_j`` (the consensus residual, 0/0 for identical replicas, is
dropped). DmSGD needs no special case.

Topologies (:func:`mixing_weights`): all are circulant, ``w_ij = c[(i − j) mod n]``, so uniform weights over self and
in-neighbours make ``W`` doubly stochastic (asserted, :func:`check_doubly_stochastic`):

* ``"ring"``: neighbours ``i ± 1`` (weights 1/3; a ring of 2 is the complete graph, 1/2; a ring of 3 is complete);
* ``"exponential"``: the *static* exponential graph (Ying et al., NeurIPS 2021, arXiv:2110.13363): ``i`` receives
  from ``i − 2^k`` (and sends to ``i + 2^k``) for every power of two ``2^k < n``, weights ``1/(⌈log2 n⌉ + 1)``;
  directed, so ``W`` is doubly stochastic but not symmetric for n ≥ 4;
* ``"one_peer_exponential"``: the time-varying one-peer exponential graph of the same paper: at step ``k`` rank
  ``i`` receives from ``i − 2^(k mod ⌈log2 n⌉)`` only, weights 1/2 (one send and one receive per step);
* ``"complete"``: ``W = J/n``, a sanity check equal to all-reduce momentum SGD.

Communication: one flat buffer per parameter (device, dtype) per step; every rank posts its ``irecv`` from each
in-neighbour and its ``isend`` to each out-neighbour over the data-parallel group (``batch_isend_irecv``), then waits
for all of them — the same calls in the
same order on every rank, at one place in :meth:`step`. Works with gloo (CPU tensors) and NCCL (CUDA tensors).
Every parameter of the groups takes part, with a zero gradient where ``p.grad`` is None (every rank must send the same
layout). The step counter that drives ``"one_peer_exponential"`` is kept in each parameter's state (``"step"``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.distributed as dist

__all__ = ["DecentLaM", "DecentralizedOptimizer", "DmSGD", "TOPOLOGIES", "Topology", "check_doubly_stochastic",
           "mixing_matrix", "mixing_weights"]  # fmt: skip

Topology = Literal["ring", "exponential", "one_peer_exponential", "complete"]
TOPOLOGIES: tuple[str, ...] = ("ring", "exponential", "one_peer_exponential", "complete")
_TOL = 1e-12


def _log2_ceil(n: int) -> int:
    return max(1, math.ceil(math.log2(n))) if n > 1 else 0


def mixing_weights(topology: str, n: int, step: int = 0) -> dict[int, float]:
    """The circulant weights of a topology: ``{d: c_d}`` with ``x_i ← Σ_d c_d x_{(i − d) mod n}`` (``d`` in
    ``[0, n)``; ``d = 0`` is the rank itself; duplicate offsets merged), uniform over self and in-neighbours.

    Args:
        topology: one of :data:`TOPOLOGIES`.
        n: number of ranks (>= 1).
        step: optimizer step (only ``"one_peer_exponential"`` varies with it).

    Raises:
        ValueError: unknown topology or ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"the number of ranks must be >= 1, got {n}")
    if topology == "ring":
        offsets = {0, 1 % n, (n - 1) % n}
    elif topology == "exponential":
        offsets = {0} | {(2**k) % n for k in range(_log2_ceil(n))}
    elif topology == "one_peer_exponential":
        offsets = {0} | ({(2 ** (step % _log2_ceil(n))) % n} if n > 1 else set())
    elif topology == "complete":
        offsets = set(range(n))
    else:
        raise ValueError(f"unknown topology {topology!r}; expected one of {list(TOPOLOGIES)}")
    return {d: 1.0 / len(offsets) for d in sorted(offsets)}


def mixing_matrix(topology: str, n: int, step: int = 0) -> torch.Tensor:
    """The mixing matrix ``W`` (shape ``(n, n)``, float64): ``x_i ← Σ_j W[i, j] x_j`` (row ``i``: what rank ``i``
    takes from each rank ``j``). Raises as :func:`mixing_weights`."""
    w = torch.zeros(n, n, dtype=torch.float64)
    for d, c in mixing_weights(topology, n, step).items():
        for i in range(n):
            w[i, (i - d) % n] += c
    return w


def check_doubly_stochastic(w: torch.Tensor, name: str = "W") -> None:
    """Assert that ``w`` (shape ``(n, n)``) is a valid mixing matrix: non-negative, rows and columns summing to 1
    (the paper's assumption on ``W``; it keeps the average ``x̄`` moving like centralized momentum SGD).

    Raises:
        ValueError: naming the first violated condition.
    """
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"{name} must be square, got shape {tuple(w.shape)}")
    if bool((w < -_TOL).any()):
        raise ValueError(f"{name} has negative weights")
    ones = torch.ones(w.shape[0], dtype=w.dtype)
    for what, sums in (("row", w.sum(dim=1)), ("column", w.sum(dim=0))):
        if not torch.allclose(sums, ones, atol=1e-9, rtol=0.0):
            raise ValueError(f"{name} is not doubly stochastic: {what} sums {sums.tolist()}")


class DecentralizedOptimizer(torch.optim.Optimizer):
    """Shared base of :class:`DmSGD` and :class:`DecentLaM`: hyper-parameters, topology and the neighbour exchange.

    Args:
        params: parameters or parameter groups (each rank its own replica, same shapes and order on every rank).
        lr: learning rate γ (>= 0; a scheduler may change it, equally on every rank).
        momentum: β in [0, 1).
        weight_decay: L2 coefficient λ >= 0, added to the gradient.
        topology: one of :data:`TOPOLOGIES` (see the module docstring).
        group: the process group to average over (None: the default group; :meth:`set_group` changes it).

    Raises:
        ValueError: an out-of-range hyper-parameter or an unknown topology.
    """

    name = "decentralized"

    def __init__(self, params: Iterable[Any], lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 topology: str = "ring", group: Any = None) -> None:
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {topology!r}; expected one of {list(TOPOLOGIES)}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.topology = topology
        self.group = group
        self.bytes_sent = 0  # this rank's payload bytes sent so far

    def set_group(self, group: Any) -> None:
        """Average over ``group`` (the engine's data-parallel group) from now on."""
        self.group = group

    def world(self) -> tuple[int, int]:
        """``(rank, size)`` of this process in the averaging group ((0, 1) without torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()):
            return 0, 1
        return dist.get_rank(self.group), dist.get_world_size(self.group)

    def weights(self, step: int) -> dict[int, float]:
        """This step's circulant weights (:func:`mixing_weights`), checked doubly stochastic: every step through the
        circulant's sums (rows and columns of a circulant both sum to Σ c), and over the first ``⌈log2 n⌉`` steps
        (every pattern of the one-peer graph) also as the full matrix, :func:`check_doubly_stochastic` (n <= 64)."""
        n = self.world()[1]
        c = mixing_weights(self.topology, n, step)
        if any(v < 0 for v in c.values()) or abs(sum(c.values()) - 1.0) > 1e-9:
            raise ValueError(f"topology {self.topology!r} on {n} ranks: weights {c} are not doubly stochastic")
        if step < max(1, _log2_ceil(n)) and n <= 64:
            check_doubly_stochastic(mixing_matrix(self.topology, n, step), f"W of {self.topology!r} on {n} ranks")
        return c

    def mix(self, flats: list[torch.Tensor], weights: dict[int, float]) -> list[torch.Tensor]:
        """``Σ_j w_ij v_j`` for each of this rank's flat buffers ``v_i`` (each shape ``(numel,)``): every in-neighbour's
        buffers are received and every out-neighbour gets ours (one ``irecv`` / ``isend`` per buffer and neighbour,
        posted together by ``batch_isend_irecv`` — one NCCL group, no pairwise deadlock — then waited for); the
        result is summed in the order of the source ranks, the same on every rank."""
        rank, n = self.world()
        peers = [d for d in weights if d != 0]
        received: dict[int, list[torch.Tensor]] = {d: [torch.empty_like(f) for f in flats] for d in peers}
        ops = []
        for d in peers:
            src, dst = (rank - d) % n, (rank + d) % n
            for f, buf in zip(flats, received[d], strict=True):
                ops.append(dist.P2POp(dist.irecv, buf, group=self.group, group_peer=src))
                ops.append(dist.P2POp(dist.isend, f, group=self.group, group_peer=dst))
                self.bytes_sent += f.numel() * f.element_size()
        for work in dist.batch_isend_irecv(ops) if ops else []:
            work.wait()
        terms = sorted([(rank, 0, flats), *(((rank - d) % n, d, received[d]) for d in peers)])
        out = [torch.zeros_like(f) for f in flats]
        for _, d, bufs in terms:  # by source rank: every rank sums in one order (complete graph: bitwise equal)
            for o, buf in zip(out, bufs, strict=True):
                o.add_(buf, alpha=weights[d])
        return out

    def _buckets(self) -> list[list[tuple[torch.Tensor, dict[str, Any]]]]:
        """Every parameter with its group, bucketed by (device, dtype) in first-appearance order."""
        buckets: dict[tuple[torch.device, torch.dtype], list[tuple[torch.Tensor, dict[str, Any]]]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                buckets.setdefault((p.device, p.dtype), []).append((p, group))
        return list(buckets.values())

    def _next_step(self) -> int:
        """The step index k of this update (0 for the first), advanced in every parameter's state."""
        k = 0
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                k = int(st.get("step", torch.zeros(())).item())
                st["step"] = torch.tensor(float(k + 1))
        return k

    def _momentum(self, p: torch.Tensor) -> torch.Tensor:
        st = self.state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        buf: torch.Tensor = st["momentum_buffer"]
        return buf

    @staticmethod
    def _grad(p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """``g + λ x`` (a zero gradient where ``p.grad`` is None)."""
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        return g.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else g.clone()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One update of every parameter (the subclass's rule), with one neighbour exchange per (device, dtype)
        bucket; a collective step: every rank of the group must call it. Returns ``closure()`` when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        weights = self.weights(self._next_step())
        for bucket in self._buckets():
            self._update(bucket, weights)
        return loss

    def _update(self, bucket: list[tuple[torch.Tensor, dict[str, Any]]], weights: dict[int, float]) -> None:
        raise NotImplementedError


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _split(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in like]), like, strict=True)]


class DmSGD(DecentralizedOptimizer):
    """Decentralized momentum SGD (DecentLaM paper, eq. (3); adapt-then-combine): ``m_i ← β m_i + g_i``, then
    ``x_i ← Σ_j w_ij (x_j − γ m_j)``. Arguments as :class:`DecentralizedOptimizer`."""

    name = "DmSGD"

    def _update(self, bucket: list[tuple[torch.Tensor, dict[str, Any]]], weights: dict[int, float]) -> None:
        sent = []
        for p, group in bucket:
            m = self._momentum(p)
            m.mul_(group["momentum"]).add_(self._grad(p, group))
            sent.append(p - group["lr"] * m)  # x_i − γ m_i
        mixed = self.mix([_flat(sent)], weights)[0]
        for (p, _), new in zip(bucket, _split(mixed, [p for p, _ in bucket]), strict=True):
            p.copy_(new)


class DecentLaM(DecentralizedOptimizer):
    """DecentLaM (the paper's Algorithm 1): ``g̃_i = (x_i − Σ_j w_ij (x_j − γ g_j))/γ``, ``m_i ← β m_i + g̃_i``,
    ``x_i ← x_i − γ m_i``; at ``γ = 0`` the limit described in the module docstring. Arguments as
    :class:`DecentralizedOptimizer`."""

    name = "DecentLaM"

    def _update(self, bucket: list[tuple[torch.Tensor, dict[str, Any]]], weights: dict[int, float]) -> None:
        params = [p for p, _ in bucket]
        grads = [self._grad(p, group) for p, group in bucket]
        if all(group["lr"] > 0 for _, group in bucket):
            sent = [p - group["lr"] * g for (p, group), g in zip(bucket, grads, strict=True)]  # x_i − γ g_i
            mixed = _split(self.mix([_flat(sent)], weights)[0], params)
            for (p, group), z in zip(bucket, mixed, strict=True):
                lr = group["lr"]
                corrected = (p - z).div_(lr)  # g̃_i
                self._momentum(p).mul_(group["momentum"]).add_(corrected)
                p.add_(self._momentum(p), alpha=-lr)
            return
        # γ = 0 somewhere in the bucket: exchange [x_i, g_i] and take the γ → 0 limit (module docstring)
        mixed_x, mixed_g = self.mix([_flat(params), _flat(grads)], weights)
        for (p, group), wx, wg in zip(bucket, _split(mixed_x, params), _split(mixed_g, params), strict=True):
            lr = group["lr"]
            m = self._momentum(p)
            if lr > 0:
                m.mul_(group["momentum"]).add_((p - wx).div_(lr)).add_(wg)
                p.add_(m, alpha=-lr)
            else:
                m.mul_(group["momentum"]).add_(wg)
                p.copy_(wx)
