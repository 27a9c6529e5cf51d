"""Fixed-point BatchNorm export of a trained MNIST / Fashion-MNIST CNN at several bit widths (ds_spngd_lab.export).

Usage (from the repository root, inside the virtualenv):
    python benchmarks/export_quantized_bn.py [--dataset mnist|fashion-mnist] [--model cnn|cnn4] [--steps 150]
        [--batch 128] [--lr 0.1] [--momentum 0.9] [--bits 8 12 16] [--seed 0] [--state-dict FILE] [--threads T]

train.py writes no plain model file (no ``torch.save`` / ``save_checkpoint`` of the model), so by default the script
trains the model itself: ``--steps`` steps of plain ``torch.optim.SGD`` (momentum ``--momentum``, constant ``--lr``)
on random training batches, then recomputes the BN running statistics as plain averages over 4,000 training images
(precise BN, :func:`ds_spngd_lab.evaluation.recalibrate_bn`). ``--state-dict FILE`` loads weights instead: a file
from ``torch.save(model.state_dict())`` of ``build_model(--model, 10, 1)``, or a dict holding it under ``"module"``
(the layout of DeepSpeed's ``mp_rank_00_model_states.pt``); it is read with ``weights_only=True``.

For every ``--bits`` the BN layers are replaced by :class:`~ds_spngd_lab.export.QuantizedBatchNorm` (integer
multipliers of that width, int32/int64 offsets, one power-of-two scale per layer) and the whole test set is
evaluated. Columns: float and quantized top-1 accuracy; max |Δlogit| over test images and classes (every BN
quantized at once, so the per-layer errors compound through the network); the max over layers and channels of the
per-layer bound :func:`~ds_spngd_lab.export.bn_error_bound` at the test set's per-channel max |BN input|, and the
largest per-layer error actually measured on those inputs (the float model's BN inputs fed to the quantized layer,
against ``s x + t`` in float64); the shared exponents ``k`` (scale ``2^-k``) of the layers. A line before the table
reports the real-arithmetic BN fold into the convolutions (:func:`~ds_spngd_lab.export.fold_bn_into_conv`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ds_spngd_lab.data.fashion_mnist import load_fashion_mnist
from ds_spngd_lab.data.mnist import MnistSplits, load_mnist
from ds_spngd_lab.evaluation import recalibrate_bn
from ds_spngd_lab.export import fold_bn_into_conv, measure_bn_errors, quantize_bn, quantized_layers
from ds_spngd_lab.models import build_model

EVAL_BATCH = 1000
RECALIBRATION_IMAGES = 4000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("mnist", "fashion-mnist"), default="mnist")
    p.add_argument("--model", choices=("cnn", "cnn4"), default="cnn")
    p.add_argument("--steps", type=int, default=150, help="SGD steps when training here")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--bits", type=int, nargs="+", default=[8, 12, 16], help="multiplier widths, each in [2, 32]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state-dict", type=Path, default=None, help="load these weights instead of training")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        p.error("--steps and --batch must be positive")
    return args


def load_splits(dataset: str) -> MnistSplits:
    """The dataset as normalised tensors (FileNotFoundError with install hints if absent)."""
    return load_mnist() if dataset == "mnist" else load_fashion_mnist()


def train(model: nn.Module, data: MnistSplits, args: argparse.Namespace) -> float:
    """Plain momentum SGD on cross-entropy; returns the mean loss of the last 20 steps."""
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    losses: list[float] = []
    for _ in range(args.steps):
        idx = torch.randint(0, data.train_x.shape[0], (args.batch,), generator=g)
        loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    recalibrate_bn(model, list(data.train_x[:RECALIBRATION_IMAGES].split(500)))
    return sum(losses[-20:]) / len(losses[-20:])


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a plain state dict, or one stored under ``"module"`` (DeepSpeed's model-states file).

    Raises:
        ValueError: the file holds no state dict.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("module"), dict):
        state = state["module"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    model.load_state_dict(state)


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(N, classes)`` float32 logits, in batches of :data:`EVAL_BATCH`."""
    return torch.cat([model(b) for b in x.split(EVAL_BATCH)])


def accuracy(out: torch.Tensor, y: torch.Tensor) -> float:
    return float((out.argmax(dim=1) == y).double().mean())


def export_row(model: nn.Module, data: MnistSplits, ref: torch.Tensor, bits: int) -> str:
    """One markdown table row for ``bits``-bit quantized BN."""
    quantized = quantize_bn(model, bits=bits)
    out = logits(quantized, data.test_x)
    reports = measure_bn_errors(model, quantized, data.test_x.split(EVAL_BATCH))
    bound = max(float(r.bound.max()) for r in reports.values())
    error = max(float(r.max_error.max()) for r in reports.values())
    ks = ", ".join(str(int(q.frac_bits)) for q in quantized_layers(quantized).values())
    dlogit = float((out - ref).abs().max())
    return (f"| {bits} | {100 * accuracy(ref, data.test_y):.2f} | {100 * accuracy(out, data.test_y):.2f} "
            f"| {dlogit:.3e} | {bound:.3e} | {error:.3e} | {ks} |")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_splits(args.dataset)
    model = build_model(args.model, num_classes=10, in_channels=1)
    start = time.perf_counter()
    if args.state_dict is not None:
        load_weights(model, args.state_dict)
        origin = f"weights from {args.state_dict}"
    else:
        loss = train(model, data, args)
        origin = (f"trained here: {args.steps} SGD steps, batch {args.batch}, lr {args.lr}, momentum {args.momentum}, "
                  f"final loss {loss:.3f}, {time.perf_counter() - start:.0f} s")  # fmt: skip
    model.eval()
    ref = logits(model, data.test_x)
    folded = fold_bn_into_conv(model)
    fold_out = logits(folded, data.test_x)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    fold_diff = float((fold_out - ref).abs().max())
    print(f"{args.model} on {args.dataset} ({origin}); test set {data.test_x.shape[0]} images")
    print(f"BN folded into the convolutions (real arithmetic, fp32 weights): {n_bn} BN layers left, "
          f"accuracy {100 * accuracy(fold_out, data.test_y):.2f}%, max |Δlogit| {fold_diff:.2e}")
    print()
    print("| bits | float acc % | quantized acc % | max abs Δlogit | max per-layer bound | max per-layer error "
          "| shared exponents k |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---|")
    for bits in args.bits:
        print(export_row(model, data, ref, bits), flush=True)


if __name__ == "__main__":
    main()
