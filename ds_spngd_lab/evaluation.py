"""Evaluation of the reference training scripts, sharded over ranks with the counts all-reduced: test top-1 of an
image classifier (train.py; with BatchNorm statistics optionally recomputed on recent training inputs and averaged
over ranks) and the validation loss of a language model (train_lm.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ds_spngd_lab.models.gpt import lm_logits

if TYPE_CHECKING:
    from ds_spngd_lab.data.image_folder import BatchSource
    from ds_spngd_lab.data.text import EvalWindows

EVAL_BATCH = 1000
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def check_buffer_dtypes(model: nn.Module, dtype: torch.dtype) -> None:
    """Refuse low-precision runs whose floating buffers were left in another dtype.

    DeepSpeed 0.19.8 casts only parameters for bf16/fp16 and keeps buffers (BatchNorm running statistics) as loaded
    unless ``"data_types": {"buffer_dtype": ...}`` is set; BatchNorm then fails at the first forward with
    "expected scalar type BFloat16 but found Float".

    Raises:
        ValueError: naming the first mismatched buffer and the config key that fixes it.
    """
    if dtype == torch.float32:
        return
    for name, buf in model.named_buffers():
        if buf.is_floating_point() and buf.dtype != dtype:
            short = "bf16" if dtype == torch.bfloat16 else "fp16"
            raise ValueError(
                f"buffer {name} is {buf.dtype} but the model runs in {dtype}: DeepSpeed casts only parameters; add "
                f'"data_types": {{"buffer_dtype": "{short}"}} to the DeepSpeed config'
            )


def average_buffers(model: nn.Module, world: int) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks so every rank evaluates one model."""
    if world == 1:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """Precise BatchNorm statistics (Wu & Johnson 2021, arXiv:2105.07576): replace each BN layer's running mean/var
    by their plain average over ``batches`` (recent training inputs, already on the model's device and dtype) under
    the current weights, instead of the EMA that lags behind fast-moving weights. Weights are not changed."""
    bns = [m for m in model.modules() if isinstance(m, BATCH_NORMS) and m.track_running_stats]
    if not bns or not batches:
        return
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    for x in batches:
        model(x)
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    model.train(was_training)


def top1_accuracy(
    engine: Any, source: BatchSource, dtype: torch.dtype, world: int, recent: Sequence[torch.Tensor] = ()
) -> float:
    """:func:`_top1_accuracy` of the consensus model when the replicas differ (DecentLaM / DmSGD: the average of every
    rank's parameters, :func:`ds_spngd.integrations.deepspeed.decentralized_engine.consensus_parameters`; each rank's
    own parameters are back afterwards), of the model itself otherwise."""
    from ds_spngd.integrations.deepspeed.decentralized_engine import consensus_parameters

    with consensus_parameters(engine):
        return _top1_accuracy(engine, source, dtype, world, recent)


@torch.no_grad()
def _top1_accuracy(
    engine: Any, source: BatchSource, dtype: torch.dtype, world: int, recent: Sequence[torch.Tensor] = ()
) -> float:
    """Top-1 accuracy in [0, 1] over the whole evaluation set (each rank its shard; counts all-reduced).

    With ``recent`` training inputs, BatchNorm statistics are first recomputed on them (:func:`recalibrate_bn`);
    either way they are then averaged over ranks so every rank evaluates the same model."""
    recalibrate_bn(engine.module, recent)
    engine.eval()
    average_buffers(engine.module, world)
    counts = torch.zeros(2, dtype=torch.float64)
    for x, y in source.eval_batches(EVAL_BATCH):
        logits = engine(x.to(engine.device, dtype=dtype))
        counts[0] += (logits.argmax(dim=1).cpu() == y.cpu()).sum().item()
        counts[1] += y.numel()
    if world > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    engine.train()
    if counts[1] == 0:
        raise RuntimeError("the evaluation set is empty")
    return float(counts[0] / counts[1])


def validation_loss(engine: Any, source: EvalWindows, rank: int, world: int, batch: int) -> float:
    """:func:`_validation_loss` of the consensus model when the replicas differ (DecentLaM / DmSGD, as
    :func:`top1_accuracy`), of the model itself otherwise."""
    from ds_spngd.integrations.deepspeed.decentralized_engine import consensus_parameters

    with consensus_parameters(engine):
        return _validation_loss(engine, source, rank, world, batch)


@torch.no_grad()
def _validation_loss(engine: Any, source: EvalWindows, rank: int, world: int, batch: int) -> float:
    """Mean validation cross-entropy per token (nats) over ``source``'s windows (each rank its shard, sums reduced)."""
    engine.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    for x, y in source.batches(rank, world, batch):
        logits = lm_logits(engine(x.to(engine.device)))
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.to(engine.device).reshape(-1),
                               reduction="sum")  # fmt: skip
        sums += torch.tensor([float(loss), y.numel()], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    engine.train()
    if sums[1] == 0:
        raise RuntimeError("the validation subset is empty")
    return float(sums[0] / sums[1])
