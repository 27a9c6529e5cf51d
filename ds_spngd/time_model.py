"""Step time of SP-NGD's precondition modes, predicted from the cost model's bytes and FLOPs and one machine's
measured rates (issue 16, item 5).

**The model.** One rank's amortized step of mode m at W data-parallel ranks, in seconds::

    t_m(W) = t_compute + B_m(W) / β + (S / k_f + P_m(W)) / R_gemm + I_m(W) / (k_inv · R_inv)

* ``t_compute``: the step without its communication (forward, backward, the update), the same for every mode. It is
  calibrated from a measured SGD step at W₀ ranks: ``t_compute = t_SGD(W₀) − B_sgd(W₀) / β``, so the model
  reproduces the measured SGD step exactly at W₀ and every SP-NGD term is an *addition* to it.
* ``B_m(W)``: :attr:`ds_spngd.cost_model.ModeCost.amortized_bytes`, the ring-model bytes a rank sends per step
  (refreshes and inversions amortized over ``factor_update_steps`` k_f and ``inv_update_steps`` k_inv).
* ``β``: bytes per second a rank sends, measured as one all-reduce of n bytes among the ranks and counted with the
  same ring model, ``ring_bytes("all_reduce", n, W) / seconds`` (:func:`measure_bandwidth`).
* ``S``: the factor statistics of one refresh step on one rank (:func:`statistics_flops`): for every Kronecker block
  and side (B diagonal blocks of b × b), 2 · rows · B · b², with rows = m · T (m = ⌈f · N⌉ sampled examples of the
  N-example micro-batch, f = ``factor_sample_fraction``; T = output positions per example of the layer, 1 for a
  Linear under ``kfac_approx="reduce"``). Every rank computes its own statistics in every mode.
* ``P_m(W)``, ``I_m(W)``: :attr:`ModeCost.precondition_flops` (busiest rank, every step) and
  :attr:`ModeCost.inversion_flops` (busiest rank, per inversion step), counted as :mod:`ds_spngd.cost_model` does.
* ``R_gemm``: FLOP/s of one d × d fp32 matmul on one rank (:func:`measure_gemm_rate`), used for statistics and
  preconditioning (both are GEMMs); ``R_inv``: FLOP/s of the inversion the config asks for, timed on one d × d SPD
  matrix and counted with the cost model's constants — :class:`ds_spngd.linalg.InverseJob` with
  :data:`~ds_spngd.cost_model.INVERSE_FLOPS_PER_D3` · d³ for ``"inverse"``, :func:`ds_spngd.linalg.sym_eigh` with
  :data:`~ds_spngd.cost_model.EIGEN_FLOPS_PER_D3` · d³ for ``"eigen"`` (:func:`measure_inversion_rate`).

**Assumptions** (what the prediction leaves out, so where a measurement may differ):

1. Nothing overlaps: communication, statistics, preconditioning and inversion all add to ``t_compute`` (the factor
   reduction launched from the backward hooks can hide behind it; then the measured step is shorter).
2. One rate per kind of work: each is calibrated at one size, the FLOP-weighted median block size of the work it
   stands for (:func:`calibration_dims`), so the small matrices (BatchNorm's unit-wise 2 × 2 blocks, 64-wide
   factors), which run well below that rate, are under-counted.
3. The bandwidth does not depend on the message size, the collective or W: no latency term (``mem_opt``'s W
   broadcasts per step cost their bytes only), and a projection to other W assumes each rank keeps the measured β
   (the 2-rank gloo figure of a single machine says nothing about a real network: it projects "more ranks like
   these").
4. The busiest rank sets the step (collectives synchronize the ranks); ``t_compute`` and ``S`` do not change with W
   (weak scaling: the same micro-batch per rank).
5. Elementwise work is not counted: momentum, KL-clipping, weight rescaling, the factors' running averages, packing,
   im2col (``F.unfold``), unit-wise statistics and the eigendecomposition fallback of a failed Cholesky.
"""

from __future__ import annotations

import math
import statistics as stats
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ds_spngd.comm.wire import ring_bytes
from ds_spngd.cost_model import EIGEN_FLOPS_PER_D3, INVERSE_FLOPS_PER_D3, ModeCost, side_apply_flops
from ds_spngd.curvature.base import FisherBlock
from ds_spngd.curvature.kronecker import KroneckerBlock, is_conv1d
from ds_spngd.linalg import InverseJob, sym_eigh

__all__ = ["MachineRates", "StepTime", "calibration_dims", "compute_time", "measure_bandwidth", "measure_gemm_rate",
           "measure_inversion_rate", "positions_per_example", "predict_step_time", "statistics_flops"]


@dataclass(frozen=True)
class MachineRates:
    """One rank's calibrated rates (module docstring).

    Attributes:
        gemm_flops: R_gemm, FLOP/s of an fp32 matmul (statistics and preconditioning).
        inversion_flops: R_inv, FLOP/s of the config's inversion, counted with the cost model's constants.
        bytes_per_s: β, ring-model bytes a rank sends per second (``math.inf`` on one rank: nothing is sent).
    """

    gemm_flops: float
    inversion_flops: float
    bytes_per_s: float


@dataclass(frozen=True)
class StepTime:
    """The predicted amortized step of one mode at one world size, term by term (seconds, module docstring).

    Attributes:
        mode, world: as :class:`ModeCost`.
        compute_s: t_compute. comm_s: B_m(W)/β. statistics_s: S/(k_f·R_gemm) (0 for ``sgd``).
        precondition_s: P_m(W)/R_gemm. inversion_s: I_m(W)/(k_inv·R_inv).
    """

    mode: str
    world: int
    compute_s: float
    comm_s: float
    statistics_s: float
    precondition_s: float
    inversion_s: float

    @property
    def total_s(self) -> float:
        """t_m(W): the sum of the terms."""
        return self.compute_s + self.comm_s + self.statistics_s + self.precondition_s + self.inversion_s


def compute_time(sgd_step_s: float, sgd: ModeCost, rates: MachineRates) -> float:
    """t_compute = t_SGD(W₀) − B_sgd(W₀)/β: a measured SGD step (seconds) at ``sgd.world`` ranks less its modelled
    all-reduce.

    Raises:
        ValueError: ``sgd`` is not the ``"sgd"`` cost, or the step is not positive.
    """
    if sgd.mode != "sgd":
        raise ValueError(f"compute_time needs the sgd cost, got {sgd.mode!r}")
    if not sgd_step_s > 0:
        raise ValueError(f"the measured SGD step must be positive, got {sgd_step_s}")
    return sgd_step_s - sgd.amortized_bytes / rates.bytes_per_s


def predict_step_time(cost: ModeCost, compute_s: float, refresh_statistics_flops: float,
                      rates: MachineRates) -> StepTime:
    """t_m(W) of ``cost`` (its mode, world and intervals) term by term.

    Args:
        cost: the mode's :class:`ModeCost` at the world size to predict.
        compute_s: t_compute (:func:`compute_time`).
        refresh_statistics_flops: S, one rank's statistics FLOPs on a refresh step (:func:`statistics_flops`);
            ignored for ``"sgd"``.
        rates: the calibrated :class:`MachineRates` (all positive).

    Raises:
        ValueError: a non-positive rate.
    """
    if min(rates.gemm_flops, rates.inversion_flops, rates.bytes_per_s) <= 0:
        raise ValueError(f"rates must be positive, got {rates}")
    curvature = cost.mode != "sgd"
    return StepTime(
        mode=cost.mode, world=cost.world, compute_s=compute_s, comm_s=cost.amortized_bytes / rates.bytes_per_s,
        statistics_s=(refresh_statistics_flops / cost.factor_update_steps / rates.gemm_flops) if curvature else 0.0,
        precondition_s=cost.precondition_flops / rates.gemm_flops,
        inversion_s=cost.inversion_flops / cost.inv_update_steps / rates.inversion_flops)


# ---- statistics FLOPs ----------------------------------------------------------------------------------------------
def positions_per_example(model: nn.Module, example: Tensor) -> dict[str, int]:
    """T per layer: output positions per example of every nn.Linear, nn.Conv2d and Hugging Face Conv1D of ``model``
    (keyed by ``named_modules`` name) in one forward of ``example`` (any batch size; a model and input on the meta
    device allocate nothing; the forward runs in eval mode, so BatchNorm takes a batch of one). Conv2d: H_out · W_out;
    Linear / Conv1D: output elements / (N · d_out)."""
    found: dict[str, int] = {}
    handles = []

    def hook(name: str, conv: bool) -> Callable[[nn.Module, object, Tensor], None]:
        def record(_m: nn.Module, _inputs: object, out: Tensor) -> None:
            n = int(out.shape[0])
            d_out = int(out.shape[1] if conv else out.shape[-1])
            found[name] = int(out.numel()) // max(1, n * d_out)

        return record

    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) or is_conv1d(module):
            handles.append(module.register_forward_hook(hook(name, isinstance(module, nn.Conv2d))))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for m, training in modes:
            m.training = training
        for h in handles:
            h.remove()
    return found


def statistics_flops(blocks: Sequence[FisherBlock], positions: Mapping[str, int], micro_batch: int,
                     sample_fraction: float = 1.0) -> float:
    """S: one rank's factor-statistics FLOPs on a refresh step (module docstring): Σ over Kronecker blocks and their
    two sides (B blocks of b × b; b = 1 for a diagonal side) of 2 · m · T · B · b², m = ⌈f · N⌉.

    Args:
        blocks: the optimizer's blocks (other kinds than Kronecker count 0).
        positions: T per block name (:func:`positions_per_example`).
        micro_batch: N, examples per rank and micro-batch.
        sample_fraction: f, ``factor_sample_fraction``.

    Raises:
        KeyError: a Kronecker block without an entry in ``positions``.
    """
    m = math.ceil(sample_fraction * micro_batch)
    total = 0.0
    for block in blocks:
        if not isinstance(block, KroneckerBlock):
            continue
        t = positions[block.name] if block.is_conv or block.ctx.kfac_approx == "expand" else 1
        total += sum(2.0 * m * t * side.blocks * side.dim**2 for side in block.sides)
    return total


# ---- calibration ---------------------------------------------------------------------------------------------------
def _weighted_median(pairs: list[tuple[int, float]]) -> int:
    """The smallest value whose cumulative weight reaches half the total (``pairs``: (value, weight))."""
    total = sum(w for _, w in pairs)
    acc = 0.0
    for value, weight in sorted(pairs):
        acc += weight
        if acc >= total / 2:
            return value
    return 0


def calibration_dims(blocks: Sequence[FisherBlock], method: str = "inverse", floor: int = 64,
                     cap: int = 2048) -> tuple[int, int]:
    """(GEMM side, inversion side) to calibrate at: the FLOP-weighted medians of the block sizes b the work runs on —
    every Kronecker side applied to the gradient (weight 2·B·b²·n, :func:`~ds_spngd.cost_model.side_apply_flops`)
    and every inverted piece (weight B·b³, :meth:`FisherBlock.part_shapes`) — clamped to [floor, cap] (rates differ
    with the size: a 256-wide Cholesky runs at about half the FLOP/s of a 2048-wide one on one CPU core)."""
    gemm: list[tuple[int, float]] = []
    inv: list[tuple[int, float]] = []
    for block in blocks:
        if isinstance(block, KroneckerBlock):
            fa, fg = block.sides
            gemm += [(s.dim, side_apply_flops(s.blocks, s.dim, n)) for s, n in ((fg, fa.padded), (fa, fg.padded))
                     if s.dim > 1]
        for k in range(len(block.parts())):
            shapes = block.part_shapes(k, method)
            inv += [(int(s[-1]), (int(s[0]) if len(s) == 3 else 1) * float(s[-1]) ** 3)
                    for s in shapes[:: 1 if method == "inverse" else 2] if int(s[-1]) > 2]
    gemm_dim, inv_dim = (min(cap, max(floor, _weighted_median(pairs))) for pairs in (gemm, inv))
    return gemm_dim, inv_dim


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: allocator, BLAS threads
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return stats.median(times)


def measure_gemm_rate(size: int = 1024, repeats: int = 5) -> float:
    """R_gemm: FLOP/s (2·size³ per product) of a size × size fp32 matmul on this process's threads (CPU)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    return 2.0 * size**3 / _median_seconds(lambda: a @ b, repeats)


def measure_inversion_rate(size: int = 1024, method: str = "inverse", repeats: int = 3) -> float:
    """R_inv: FLOP/s of the inversion of one size × size SPD matrix as the optimizer runs it (``"inverse"``:
    :class:`InverseJob`, counted as INVERSE_FLOPS_PER_D3·size³; ``"eigen"``: :func:`sym_eigh`,
    EIGEN_FLOPS_PER_D3·size³) on this process's threads (CPU).

    Raises:
        ValueError: an unknown method.
    """
    if method not in ("inverse", "eigen"):
        raise ValueError(f"unknown inverse_method {method!r}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(size, 2 * size, generator=gen)
    spd = x @ x.T / (2 * size)
    if method == "inverse":
        return INVERSE_FLOPS_PER_D3 * size**3 / _median_seconds(lambda: InverseJob.start(spd, 0.01), repeats)
    return EIGEN_FLOPS_PER_D3 * size**3 / _median_seconds(lambda: sym_eigh(spd, check=False), repeats)


def measure_bandwidth(numel: int = 4 << 20, repeats: int = 5, group: dist.ProcessGroup | None = None) -> float:
    """β: ring-model bytes a rank sends per second in an all-reduce of ``numel`` fp32 values over ``group``
    (default world), median over ``repeats``; every rank of the group must call it. ``math.inf`` without an
    initialized process group or on one rank (nothing is sent)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) <= 1:
        return math.inf
    buf = torch.ones(numel, dtype=torch.float32)

    def once() -> None:
        dist.barrier(group)
        t0 = time.perf_counter()
        dist.all_reduce(buf, group=group)
        times.append(time.perf_counter() - t0)

    times: list[float] = []
    for _ in range(max(1, repeats) + 1):
        once()
    seconds = stats.median(times[1:])  # the first one sets up the connections
    return ring_bytes("all_reduce", numel * 4.0, dist.get_world_size(group)) / seconds
