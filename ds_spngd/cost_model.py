"""Bytes and preconditioning FLOPs per rank of SP-NGD's precondition modes, from the shapes alone (issue 9 item 2).

Everything here is computed from the optimizer's real block list (:attr:`ds_spngd.SPNGD.blocks`, which a model on
the meta device gives without allocating anything) and the LPT owners of :func:`ds_spngd.comm.inversion.plan_parts`
(one owner per block *part*; the owner of a block's first part is its *block owner*), so the numbers follow the code.

**Collective costs**: the one ring model of :func:`ds_spngd.comm.wire.ring_bytes` (bytes each rank sends; for
ring algorithms sent = received), also used to log measured collectives: all-reduce 2(W−1)/W · n; reduce,
broadcast, reduce-scatter and all-gather (W−1)/W · n each (Patarasuk & Yuan, JPDC 69(2) 2009; Thakur, Rabenseifner &
Gropp, IJHPCA 19(1) 2005); 0 at W = 1. A reduce to one rank is counted as a reduce-scatter and a broadcast as a
scatter + all-gather (amortized over a pipelined ring).

**Payloads.** P = gradient elements of every optimized parameter, P_blk those of parameters with a Fisher block;
F = Σ over factors of B·d(d+1)/2 (packed upper triangles, :attr:`SymmetricFactor.packed_numel`) in ``comm_dtype``;
the preconditioner of part k of a block is :meth:`FisherBlock.part_shapes` in fp32; the preconditioned gradients are
fp32 (``share_directions``).

**Modes** (per rank; "refresh" = a factor-refresh step, every ``factor_update_steps``; "inversion" every
``inv_update_steps``; the per-mode terms are methods of the placement strategies, :mod:`ds_spngd.placement`):

* ``sgd``: DeepSpeed's all-reduce of every gradient only: 2(W−1)/W · P · grad_bytes every step.
* ``comm_opt`` (default): the same all-reduce every step; on refresh steps every factor reduced to its owner,
  (W−1)/W · F; on inversion steps every part's preconditioner broadcast by its owner, Σ parts · 4 bytes; every rank
  preconditions every block every step.
* ``mem_opt``: the same all-reduce and factor reduction; on inversion steps only parts drafted by another rank than
  their block owner are broadcast; every step every rank in turn broadcasts its blocks' preconditioned gradients and
  one fp32 partial KL-clip sum (W broadcasts, idle ranks included): (P_blk + W) · 4 bytes received by every rank;
  block owners precondition their blocks only.
* ``reduce_scatter`` (SP-NGD's own schedule, Osawa et al. CVPR 2019, arXiv:1811.12019 §4): DeepSpeed's all-reduce
  off; block gradients reduced to their block owners, (W−1)/W · P_blk · grad_bytes; parameters without a block
  all-reduced, 2(W−1)/W · (P − P_blk) · grad_bytes; preconditioned gradients all-gathered,
  (W−1)/W · P_blk · direction_bytes — one all-reduce's bytes when grad_bytes = direction_bytes; factors as above;
  preconditioners as ``mem_opt``.

Amortized bytes per step = every-step bytes + refresh bytes / factor_update_steps + inversion bytes / inv_update_steps.

**FLOPs.** Preconditioning a Kronecker block (gradient padded to d_G × d_A, sides of B blocks of b):
one side application costs 2·B·b²·n for the n columns (rows) of the other side (dense: B = 1, b = d; diagonal
sides, b = 1: B·n multiplies), so the dense "inverse" method costs 2·d_G·d_A·(d_G + d_A); "eigen" applies both
eigenbases twice plus one elementwise scale, 2·(left + right) + d_G·d_A. A unit-wise block of U units of k × k:
2·k²·U. Inverting part k (one B × b × b matrix, its factors combined as the code combines them):
:data:`INVERSE_FLOPS_PER_D3` · B·b³ for the "inverse" method — Cholesky b³/3, ``solve_triangular`` against the dense
identity b³, the GEMM L⁻ᵀL⁻¹ 2b³, as :class:`ds_spngd.linalg.InverseJob` does it; :data:`EIGEN_FLOPS_PER_D3` · B·b³
for "eigen" (symmetric eigendecomposition with vectors, Golub & Van Loan); 2 per entry for a diagonal side (damping
add, reciprocal); the closed form of unit-wise blocks (:data:`CLOSED_FORM_FLOPS` per unit). The busiest rank is the
maximum over ranks; with more ranks than parts most ranks own nothing.

Not counted: the step's agreement all-reduce and the trace all-reduce of multi-owner blocks (O(number of factors)
floats), ZeRO 1/2's rebuilding of block gradients from partitions, and latency (``mem_opt`` launches W broadcasts per
step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ds_spngd.comm.assignment import block_cost
from ds_spngd.comm.inversion import OwnerPlan, plan_parts
from ds_spngd.comm.wire import ring_bytes
from ds_spngd.curvature.base import FisherBlock, full_numel
from ds_spngd.curvature.kronecker import KroneckerBlock
from ds_spngd.curvature.unit_wise import UnitWiseBlock
from ds_spngd.placement import PLACEMENTS

__all__ = ["MODES", "INVERSE_FLOPS_PER_D3", "EIGEN_FLOPS_PER_D3", "CLOSED_FORM_FLOPS", "DIAGONAL_FLOPS",
           "CostSettings", "ModeCost", "Payloads", "side_apply_flops", "precondition_flops", "part_inversion_flops",
           "payloads", "mode_costs"]

MODES = ("sgd", *PLACEMENTS)
INVERSE_FLOPS_PER_D3 = 10.0 / 3.0  # Cholesky 1/3 + triangular solve against I 1 + GEMM L⁻ᵀL⁻¹ 2 (linalg.InverseJob)
EIGEN_FLOPS_PER_D3 = 9.0  # symmetric eigendecomposition with eigenvectors (Golub & Van Loan, §8.3)
CLOSED_FORM_FLOPS = {1: 2.0, 2: 10.0}  # per unit-wise unit: add + reciprocal (1×1); damping, det, 3 divides (2×2)
DIAGONAL_FLOPS = 2.0  # per entry of a diagonal side: damping add + reciprocal


def side_apply_flops(blocks: int, dim: int, n: int) -> float:
    """FLOPs of blockdiag(B blocks of dim × dim) applied to a (B·dim) × n matrix: 2·B·dim²·n (multiply-adds), or
    B·n multiplies for a diagonal side (dim = 1)."""
    return float(blocks) * n if dim == 1 else 2.0 * blocks * dim * dim * n


def precondition_flops(block: FisherBlock, method: str = "inverse") -> float:
    """FLOPs of one ``block.precondition`` call (module docstring).

    Raises:
        ValueError: an unknown block kind or method.
    """
    if isinstance(block, UnitWiseBlock):
        return 2.0 * block.k * block.k * block.units
    if isinstance(block, KroneckerBlock):
        fa, fg = block.sides
        rows, cols = fg.padded, fa.padded
        sides = side_apply_flops(fg.blocks, fg.dim, cols) + side_apply_flops(fa.blocks, fa.dim, rows)
        if method == "inverse":
            return sides
        if method == "eigen":
            return 2.0 * sides + float(rows) * cols
        raise ValueError(f"unknown inverse_method {method!r}")
    raise ValueError(f"{block.name}: no FLOP model for block kind {type(block).__name__}")


def part_inversion_flops(block: FisherBlock, k: int, method: str = "inverse") -> float:
    """FLOPs of drafting part ``k`` of ``block`` on its owner (module docstring).

    Raises:
        ValueError: an unknown method.
    """
    if method not in ("inverse", "eigen"):
        raise ValueError(f"unknown inverse_method {method!r}")
    shapes = block.part_shapes(k, method)
    if isinstance(block, UnitWiseBlock):
        shape = shapes[0]
        return (int(shape[0]) if len(shape) == 3 else 1) * CLOSED_FORM_FLOPS.get(int(shape[-1]), float(shape[-1]) ** 3)
    total = 0.0
    for shape in shapes[:: 1 if method == "inverse" else 2]:  # one matrix per piece (eigen: then its eigenvalues)
        b = int(shape[-1])
        count = int(shape[0]) if len(shape) == 3 else 1
        if b == 1:
            total += count * DIAGONAL_FLOPS
        else:
            total += (INVERSE_FLOPS_PER_D3 if method == "inverse" else EIGEN_FLOPS_PER_D3) * count * b**3
    return total


@dataclass(frozen=True)
class CostSettings:
    """Element sizes and refresh intervals of a run.

    Attributes:
        grad_bytes: bytes per gradient element in DeepSpeed's reduction (4 fp32; 2 with bf16/fp16, DeepSpeed's
            default ``communication_data_type``).
        factor_bytes: bytes per packed factor element (``comm_dtype``: 2 for bf16, NCCL's ``"auto"``).
        precond_bytes: bytes per preconditioner element (4: broadcast in fp32).
        direction_bytes: bytes per preconditioned-gradient element (4: shared in fp32).
        factor_update_steps: a refresh every this many steps.
        inv_update_steps: an inversion every this many steps.
        method: ``inverse_method`` (``"inverse"`` or ``"eigen"``).
    """

    grad_bytes: int = 4
    factor_bytes: int = 2
    precond_bytes: int = 4
    direction_bytes: int = 4
    factor_update_steps: int = 1
    inv_update_steps: int = 1
    method: str = "inverse"


@dataclass(frozen=True)
class Payloads:
    """Element counts the modes move (independent of the world size except the moved preconditioner parts).

    Attributes:
        grad_numel: P, gradient elements of every optimized parameter.
        block_numel: P_blk, those of the parameters with a Fisher block.
        factor_numel: F, Σ B·d(d+1)/2 over every factor.
        precond_numel: Σ over every part of its preconditioner's elements.
        moved_precond_numel: the same over the parts whose owner is not their block owner.
    """

    grad_numel: int
    block_numel: int
    factor_numel: int
    precond_numel: int
    moved_precond_numel: int


def payloads(blocks: Sequence[FisherBlock], grad_numel: int, plan: OwnerPlan, method: str = "inverse") -> Payloads:
    """The :class:`Payloads` of ``blocks`` with owners ``plan`` (``grad_numel``: P, every optimized element)."""
    part_numel = [sum(_numel(s) for s in blocks[i].part_shapes(k, method)) for i, k in plan.jobs]
    moved = [n for j, n in enumerate(part_numel) if plan.owners[j] != plan.block_owners[plan.jobs[j][0]]]
    return Payloads(
        grad_numel=grad_numel,
        block_numel=sum(full_numel(p) for b in blocks for p in b.params),
        factor_numel=sum(f.packed_numel for b in blocks for f in b.factors),
        precond_numel=sum(part_numel),
        moved_precond_numel=sum(moved),
    )


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@dataclass(frozen=True)
class ModeCost:
    """One mode at one world size; bytes are per rank, FLOPs those of the busiest rank.

    Attributes:
        mode: one of :data:`MODES`.
        world: W.
        step_bytes: bytes every step (gradients, directions).
        refresh_bytes: extra bytes on a factor-refresh step.
        inversion_bytes: extra bytes on an inversion step.
        factor_update_steps, inv_update_steps: the intervals the amortization uses.
        precondition_flops: busiest rank's preconditioning FLOPs per step.
        inversion_flops: busiest rank's FLOPs per inversion step.
        imbalance: LPT load (Σ B·d³) of the busiest rank / mean load over all W ranks (1 = balanced).
        lpt_vs_bound: busiest load / max(total / W, largest part): 1 = no assignment can do better.
        busy_ranks: ranks that own at least one part.
    """

    mode: str
    world: int
    step_bytes: float
    refresh_bytes: float
    inversion_bytes: float
    factor_update_steps: int
    inv_update_steps: int
    precondition_flops: float
    inversion_flops: float
    imbalance: float
    lpt_vs_bound: float
    busy_ranks: int

    @property
    def amortized_bytes(self) -> float:
        """Bytes per rank per step averaged over the refresh and inversion intervals."""
        return (self.step_bytes + self.refresh_bytes / self.factor_update_steps
                + self.inversion_bytes / self.inv_update_steps)

    @property
    def peak_bytes(self) -> float:
        """Bytes per rank on a step that refreshes and inverts."""
        return self.step_bytes + self.refresh_bytes + self.inversion_bytes


def mode_costs(blocks: Sequence[FisherBlock], grad_numel: int, world: int,
               settings: CostSettings | None = None) -> dict[str, ModeCost]:
    """:class:`ModeCost` of every mode in :data:`MODES` for ``world`` ranks (module docstring for the formulas).

    Args:
        blocks: the optimizer's blocks (``SPNGD.blocks``, e.g. of a model on the meta device).
        grad_numel: P, gradient elements of every optimized parameter (with or without a block).
        world: number of data-parallel ranks (≥ 1).
        settings: element sizes and intervals (default :class:`CostSettings`).

    Raises:
        ValueError: world < 1, or a block kind / method without a FLOP model.
    """
    s = settings or CostSettings()
    plan = plan_parts(blocks, world)
    pay = payloads(blocks, grad_numel, plan, s.method)
    w = world
    factors = ring_bytes("reduce", pay.factor_numel * s.factor_bytes, w)
    pre = [precondition_flops(b, s.method) for b in blocks]
    inv = [0.0] * w
    for j, (i, k) in enumerate(plan.jobs):
        inv[plan.owners[j]] += part_inversion_flops(blocks[i], k, s.method)
    loads = plan.assignment.loads
    costs = [block_cost([(f.blocks, f.dim) for f in blocks[i].parts()[k]]) for i, k in plan.jobs]
    bound = max(sum(loads) / w, max(costs, default=0.0))
    out = {"sgd": ModeCost("sgd", w, ring_bytes("all_reduce", pay.grad_numel * s.grad_bytes, w), 0.0, 0.0,
                           s.factor_update_steps, s.inv_update_steps, 0.0, 0.0, 1.0, 1.0, 0)}
    for mode, cls in PLACEMENTS.items():
        placement = cls()
        out[mode] = ModeCost(
            mode, w, placement.step_bytes(pay.grad_numel, pay.block_numel, s.grad_bytes, s.direction_bytes, w),
            factors, placement.inversion_bytes(pay.precond_numel * s.precond_bytes,
                                               pay.moved_precond_numel * s.precond_bytes, w),
            s.factor_update_steps, s.inv_update_steps, placement.precondition_flops(pre, plan.block_owners, w),
            max(inv), plan.assignment.imbalance, max(loads) / bound if bound > 0 else 1.0, len(set(plan.owners)))
    return out
