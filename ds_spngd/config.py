"""Schema of SP-NGD's hyperparameters: the ``"optimizer": {"type": "SPNGD", "params": {...}}`` DeepSpeed JSON section.

Every key is validated before training starts (pydantic, ``extra="forbid"``): an unknown key, a wrong type or an
out-of-range value raises :class:`SPNGDConfigError` whose message names the key, e.g. ``optimizer.params.damping``.

References:
    Osawa et al., "Large-Scale Distributed Second-Order Optimization Using Kronecker-Factored Approximate Curvature for
    Deep Convolutional Neural Networks", CVPR 2019, arXiv:1811.12019 (SP-NGD); TPAMI 2020, arXiv:2002.06015.
    Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate Curvature", ICML 2015,
    arXiv:1503.05671 (K-FAC, factored Tikhonov damping §6.3).
    Ba, Grosse & Martens, "Distributed Second-Order Optimization using Kronecker-Factored Approximations", ICLR 2017
    (KL-clipping).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["SPNGDConfig", "SPNGDConfigError", "parse_spngd_params"]


class SPNGDConfigError(ValueError):
    """Raised when the SP-NGD section of a DeepSpeed config is invalid; the message names every offending key."""


class SPNGDConfig(BaseModel):
    """SP-NGD hyperparameters (the public JSON contract).

    Attributes:
        lr: learning rate η (DeepSpeed's JSON ``scheduler`` may change it every step).
        momentum: heavy-ball momentum m applied to the preconditioned gradient.
        weight_decay: L2 coefficient, added *after* preconditioning (as torch SGD adds it to the gradient).
        damping: Tikhonov damping λ. ``inverse_method="inverse"``: A + π√λ·I and G + (√λ/π)·I are inverted
            (Martens & Grosse 2015 §6.3); ``"eigen"``: 1/(d_G d_Aᵀ + λ) in the Kronecker eigenbasis. Unit-wise blocks
            (BatchNorm/LayerNorm) use (F_c + λ·I)⁻¹.
        fisher_type: ``"emp"`` = empirical Fisher from the training labels' backward (SP-NGD); ``"mc"`` = one label per
            example sampled from the model's predictive softmax, with an extra backward used for the factors only.
        inverse_method: ``"inverse"`` (π-corrected factored Tikhonov, Cholesky in fp32 with an eigendecomposition
            fallback) or ``"eigen"`` (exact damped Kronecker inverse, as KAISA).
        factor_decay: running average of the factors, new = decay·old + (1 − decay)·batch; 0 keeps the current batch
            only (the SP-NGD recipe).
        factor_sample_fraction: fraction f ∈ (0, 1] of each micro-batch's examples (the first ⌈f·N⌉; the data is
            shuffled) whose statistics enter the factors: an unbiased estimate of the same per-example Fisher at about
            f× the factor cost. 1 = every example (the Issue's normalization contract is unchanged: factors stay
            per-example averages).
        factor_update_steps: recompute the factors every this many optimizer steps (1 = every step).
        inv_update_steps: recompute inverses/eigendecompositions every this many optimizer steps; must be a multiple of
            ``factor_update_steps`` so that an inversion always sees freshly reduced factors.
        kl_clip: κ of KL-clipping (Ba et al. 2017): scale the update by ν = min(1, sqrt(κ / (η² Σ_l v_l·g_l))); null
            disables it.
        weight_rescale: SP-NGD's replacement of weight decay: after each update rescale every preconditioned
            Linear/Conv2d weight W with ‖W‖_F > sqrt(2·d_out) to that norm.
        momentum_correction: multiply the velocity by η_t/η_{t−1} when the learning rate changes (Goyal et al. 2017,
            arXiv:1706.02677 §2.1); the velocity holds η·(update) so the correction keeps the step continuous.
        loss_reduction: how the training loss reduces over its terms in a micro-batch: ``"mean"`` (default: the
            DeepSpeed / Hugging Face convention — averaged over the examples of a classifier, over the tokens that
            carry a label of a language model) or ``"sum"``. Used to recover per-term gradients for the factors from
            the gradient of the reduced loss. The number of loss terms is counted on each refresh step from the
            model output's gradient (N × C logits: N; N × T × V logits: the positions whose gradient row is not
            zero, i.e. not ``ignore_index``), so the factors are the Fisher of the loss *per term* at any sequence
            length.
        kfac_approx: how a layer applied at several positions (N × T × d inputs) shares its weight (Eschenhagen et
            al., NeurIPS 2023, arXiv:2311.00636): ``"expand"`` (default; positions act as examples — language models,
            one loss term per token) or ``"reduce"`` (positions pooled per example — e.g. a ViT classifier; A from
            the mean input over positions, G from the summed output gradient; cheaper, O(N·d²) instead of O(N·T·d²)).
            Positions whose output gradient is exactly zero (padding, ignored labels) are left out of both factors.
            Embeddings always use expand (their reduce input factor would be a dense vocab² matrix).
        factor_dtype: the dtype of the outer products behind the factors (each product is accumulated into the fp32
            factor): ``"auto"`` (default) = bf16 when the layer's inputs / output gradients already are bf16 (a
            model under DeepSpeed's bf16), else fp32; ``"bf16"`` = always bf16 (fp16/fp32 rows are cast first);
            ``"fp32"`` = always fp32. A bf16 product x xᵀ is computed with fp32 accumulation inside the matmul and
            rounded once to bf16 (relative error ≈ 2⁻⁹ per entry, before the fp32 running average), at a fraction
            of the fp32 cost where the hardware has bf16 matrix units (the half-precision statistics of Osawa et
            al. 2019 §5). fp16 rows are never multiplied in fp16 (products overflow beyond 65504).
        max_factor_dim: a Kronecker factor side larger than this (e.g. a 50257-token vocabulary) is not held as a
            dense d × d matrix but as ``large_dim_method`` says (the spirit of Distributed Shampoo's
            ``max_preconditioner_dim``, arXiv:2309.06497).
        large_dim_method: ``"block"`` (default: block-diagonal with ⌈d/max_factor_dim⌉ equal blocks, each inverted on
            its own — Cholesky cost falls from d³ to d·max_factor_dim²) or ``"diagonal"`` (the side's diagonal only).
        skip_modules: module names (as in ``model.named_modules()``; a name matches itself and its children) that are
            left to the plain momentum-SGD update.
        precondition_mode: where the preconditioning happens (the spirit of KAISA's grad_worker_fraction,
            Pauloski et al. 2021): ``"comm_opt"`` = each block's owner inverts and broadcasts the inverses on inversion
            steps, every rank preconditions every block (least traffic between inversions); ``"mem_opt"`` = the owner
            keeps the inverses, preconditions its blocks and broadcasts the preconditioned gradients every step
            (inverses held once across the ranks); ``"reduce_scatter"`` (ZeRO stage 0 only) = SP-NGD's own schedule
            (Osawa et al. 2019 §4): DeepSpeed's gradient all-reduce is off, each block's gradient is reduced to its
            owner during the backward pass (buckets of ``bucket_cap_mb``, overlapped when ``overlap_comm``), the
            owner preconditions it and broadcasts the result — about the bytes of one all-reduce, and no rank
            preconditions another's blocks (:mod:`ds_spngd.comm.grad_reduction`).
        comm_dtype: dtype of the packed factor payload: ``"auto"`` (fp32 on gloo, bf16 on NCCL), ``"fp32"``,
            ``"bf16"`` or ``"fp16"`` (fp16 has a 65504 range: a factor mean beyond it is reported as non-finite).
        bucket_cap_mb: factors (and, in ``reduce_scatter``, gradients) are reduced in buckets of at most this many
            MiB of payload (a larger factor or layer travels alone).
        overlap_comm: launch each bucket's reduction asynchronously from the hooks as soon as its factors are final
            (A after the forward, G during the backward); the step waits on it only when it needs the factors.
            False launches everything at the step.
        nonfinite: what every rank does, together, when any rank sees NaN/Inf in a gradient or a reduced factor, or
            an owner fails to invert a factor: ``"raise"`` (default) raises FloatingPointError naming the layers on
            every rank at the same point; ``"skip"`` skips the step on every rank like DeepSpeed's fp16 overflow skip
            (factors, preconditioners, momentum, counters and parameters untouched; DeepSpeed counts it in
            ``skipped_steps`` and holds the LR scheduler). "raise" is the default because in fp32/bf16 training a
            NaN usually means divergence or bad data, which a silent skip would hide; fp16 overflow is already
            skipped by DeepSpeed's loss scaler whatever this key says.
        memory_check: before the first step, compare the SP-NGD memory planned for every rank
            (:func:`ds_spngd.memory.memory_plan`) with the memory free on the parameters' device and raise
            :class:`MemoryError` naming the largest layer, the bytes per rank and the keys to turn, instead of running
            out of memory mid-step.
        max_consecutive_skips: with ``nonfinite: "skip"``, at most this many steps in a row may be skipped; the next
            consecutive failure raises FloatingPointError (a run that keeps failing is not recovering).
        stale_statistics: per-factor adaptive refresh intervals ("stale statistics", Osawa et al. TPAMI 2020,
            arXiv:2002.06015): each factor (A, G, unit-wise block) is refreshed only on the factor-update steps its own
            interval says; a factor not due skips its statistics, its reduction and (when no factor of its block was
            refreshed since the block's last inversion) its block's inversion. False (default) = every factor on
            every ``factor_update_steps`` step, as before. The rule: :mod:`ds_spngd.staleness`.
        stale_tolerance: τ ≥ 0 of the rule: after a refresh, a factor whose running average moved by less than τ
            relative to the value it replaces (‖F_new − F_old‖_F / ‖F_old‖_F < τ) doubles its interval (up to
            ``stale_max_interval``), else its interval goes back to 1. 0 never grows an interval (every factor is
            refreshed on every factor-update step: the default schedule).
        stale_max_interval: cap on a factor's interval, in factor-update slots (multiples of
            ``factor_update_steps``); 1 never skips.
        direction: ``"natural"`` (default): the update direction is the natural gradient F̂⁻¹g with heavy-ball
            ``momentum`` and KL-clipping. ``"polar"``: for every Kronecker-factored block (Linear, Conv2d, Conv1D,
            Embedding, tied embedding/head) the direction is msgn of the Nesterov momentum of F̂⁻¹g, scaled by
            sqrt(max(1, d_out/d_in)) — Muon's orthogonalized update (Jordan et al. 2024) taken in K-FAC's whitened
            coordinates, Newton-Muon (Du & Su 2026, arXiv:2604.01472) with both Kronecker factors — applied as
            w ← w − η·(D + wd·w) without heavy ball or KL-clipping; unit-wise blocks and parameters without a block
            keep the natural / plain gradient with heavy-ball momentum and the same η (:mod:`ds_spngd.polar`).
        polar_momentum: β of the polar direction's momentum (Muon's 0.95).
        polar_nesterov: Nesterov form n = F̂⁻¹g + β·u (Muon's default) instead of u.
        polar_steps: Newton–Schulz iterations approximating msgn (5 in Muon).
        min_preconditioned_fraction: φ ∈ [0, 1]: when Fisher blocks cover less than this fraction of the optimizer's
            parameter elements (or none of them, whatever φ is), the constructor logs a warning on rank 0 naming the
            fraction and the largest parameters left to the plain momentum-SGD update (:mod:`ds_spngd.startup`).
            0 warns only when nothing is preconditioned.
        async_inverse: run each inversion step's inverse / eigendecomposition work off the critical path (Ba, Grosse
            & Martens, ICLR 2017, §3–4): a worker thread (CPU) or a CUDA side stream inverts the factors as committed
            on the inversion step, and the result is installed ``async_inverse_delay`` steps later, on the same step
            on every rank; the steps in between precondition with the previous preconditioners. A block's first
            inversion is synchronous. (:mod:`ds_spngd.comm.async_inversion`.)
        async_inverse_delay: steps from launch to install (the staleness bound), 1 ≤ delay ≤ ``inv_update_steps``;
            None = ``inv_update_steps`` (installed when the next inversion is launched).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    damping: float = Field(1e-3, gt=0.0)
    fisher_type: Literal["emp", "mc"] = "emp"
    inverse_method: Literal["inverse", "eigen"] = "inverse"
    factor_decay: float = Field(0.95, ge=0.0, lt=1.0)
    factor_sample_fraction: float = Field(1.0, gt=0.0, le=1.0)
    factor_update_steps: int = Field(1, ge=1)
    inv_update_steps: int = Field(1, ge=1)
    kl_clip: float | None = Field(None, gt=0.0)
    weight_rescale: bool = False
    momentum_correction: bool = True
    loss_reduction: Literal["mean", "sum"] = "mean"
    kfac_approx: Literal["expand", "reduce"] = "expand"
    factor_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    max_factor_dim: int = Field(4096, ge=1)
    large_dim_method: Literal["block", "diagonal"] = "block"
    memory_check: bool = True
    skip_modules: tuple[str, ...] = ()
    precondition_mode: Literal["comm_opt", "mem_opt", "reduce_scatter"] = "comm_opt"
    comm_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    bucket_cap_mb: float = Field(4.0, gt=0.0)
    overlap_comm: bool = True
    nonfinite: Literal["raise", "skip"] = "raise"
    max_consecutive_skips: int = Field(10, ge=1)
    stale_statistics: bool = False
    stale_tolerance: float = Field(0.05, ge=0.0)
    stale_max_interval: int = Field(8, ge=1)
    direction: Literal["natural", "polar"] = "natural"
    polar_momentum: float = Field(0.95, ge=0.0, lt=1.0)
    polar_nesterov: bool = True
    polar_steps: int = Field(5, ge=1, le=20)
    min_preconditioned_fraction: float = Field(0.5, ge=0.0, le=1.0)
    async_inverse: bool = False
    async_inverse_delay: int | None = Field(None, ge=1)

    @field_validator(
        "lr", "momentum", "weight_decay", "damping", "factor_decay", "factor_sample_fraction", "factor_update_steps",
        "inv_update_steps", "kl_clip", "bucket_cap_mb", "max_consecutive_skips", "max_factor_dim", "stale_tolerance",
        "stale_max_interval", "polar_momentum", "polar_steps", "min_preconditioned_fraction", "async_inverse_delay",
        mode="before",
    )
    @classmethod
    def _no_bool_numbers(cls, v: Any) -> Any:
        # pydantic's lax mode reads JSON true/false as 1/0; a boolean where a number belongs is a config mistake
        if isinstance(v, bool):
            raise ValueError("expected a number, got a boolean")
        return v

    def model_post_init(self, __context: Any) -> None:  # noqa: D401 - pydantic hook
        if self.inv_update_steps % self.factor_update_steps != 0:
            raise ValueError(
                f"inv_update_steps ({self.inv_update_steps}) must be a multiple of factor_update_steps "
                f"({self.factor_update_steps}) so that every inversion uses freshly reduced factors"
            )
        if self.async_inverse_delay is not None and self.async_inverse_delay > self.inv_update_steps:
            raise ValueError(
                f"async_inverse_delay ({self.async_inverse_delay}) must be at most inv_update_steps "
                f"({self.inv_update_steps}): one asynchronous inversion is in flight at a time")

    @property
    def inverse_delay(self) -> int:
        """Steps from launching an asynchronous inversion to installing it (``async_inverse_delay``, default
        ``inv_update_steps``)."""
        return self.async_inverse_delay if self.async_inverse_delay is not None else self.inv_update_steps


def suggest_key(key: str, known: Iterable[str]) -> str | None:
    """The known key closest to a mistyped ``key`` (:func:`difflib.get_close_matches`, case-insensitive), or None."""
    by_lower = {k.lower(): k for k in known}
    close = difflib.get_close_matches(key.lower(), list(by_lower), n=1)
    return by_lower[close[0]] if close else None


def _format_errors(err: ValidationError, prefix: str) -> str:
    """One line per offending key; an unknown key gets the closest known key, or the list of known keys."""
    lines = []
    known = sorted(SPNGDConfig.model_fields)
    unmatched = False
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        key = f"{prefix}.{loc}" if loc else prefix
        if e["type"] == "extra_forbidden":
            guess = suggest_key(loc, known)
            unmatched |= guess is None
            lines.append(f"  {key}: unknown key; did you mean {guess!r}?" if guess is not None
                         else f"  {key}: unknown key (no SP-NGD key is close to it)")
            continue
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {e['msg']}{got_s}")
    if unmatched:
        lines.append(f"  the keys of {prefix} are: {', '.join(known)}")
    return "invalid SP-NGD config:\n" + "\n".join(lines)


def parse_spngd_params(params: Any, prefix: str = "optimizer.params") -> SPNGDConfig:
    """Validate the ``optimizer.params`` dict of a DeepSpeed config.

    Args:
        params: the raw mapping from the JSON (``None`` means all defaults).
        prefix: the key path used in error messages.

    Returns:
        A frozen :class:`SPNGDConfig`.

    Raises:
        SPNGDConfigError: naming every unknown key, wrong type or out-of-range value.
    """
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise SPNGDConfigError(f"invalid SP-NGD config: {prefix} must be a JSON object, got {type(params).__name__}")
    try:
        return SPNGDConfig(**params)
    except ValidationError as err:
        raise SPNGDConfigError(_format_errors(err, prefix)) from None
    except ValueError as err:  # model_post_init cross-field checks
        raise SPNGDConfigError(f"invalid SP-NGD config: {prefix}: {err}") from None
