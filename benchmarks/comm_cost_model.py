"""Bytes and preconditioning FLOPs per rank of SP-NGD's precondition modes for ResNet-50 (ImageNet shapes) and
GPT-2-small (vocab 50257, width 768, 12 layers, tied embedding) at 8 / 64 / 1024 data-parallel ranks.

Both models are built on the meta device (nothing is allocated) and an SPNGD optimizer is built on each, as
``benchmarks/gpt2_memory.py`` does; the figures come from its real block list and the LPT part owners of
:func:`ds_spngd.comm.inversion.plan_parts`. Formulas and assumptions: :mod:`ds_spngd.cost_model`.

Usage::

    python benchmarks/comm_cost_model.py [--worlds 8 64 1024] [--models resnet50 gpt2]
        [--max-factor-dim 4096] [--large-dim-method block] [--comm-dtype bf16] [--grad-bytes N]

``factor_update_steps``, ``inv_update_steps`` and ``inverse_method`` are read from ``ds_configs/spngd.json``
(ResNet-50) and ``ds_configs/spngd_gpt.json`` (GPT-2); the gradient element size from their ``bf16`` / ``fp16``
sections (DeepSpeed's default ``communication_data_type``); the factor layout from the flags (default 4096 / block,
not the GPT config's 1024 / diagonal). Prints one markdown table: bytes per rank per step (MiB, amortized over the
refresh and inversion intervals, and on a step that does both), the ratio to SGD's gradient all-reduce, the busiest
rank's preconditioning GFLOP per step and inversion GFLOP per inversion step, and the LPT balance.

Formulas (bytes each rank sends per step, W ranks, P gradient elements, F packed factor elements B·d(d+1)/2):
the one ring model of :func:`ds_spngd.comm.wire.ring_bytes`: all-reduce 2(W−1)/W·n, reduce-scatter / all-gather /
reduce / broadcast (W−1)/W·n (Patarasuk & Yuan 2009; Thakur et al. 2005). ``sgd``: the all-reduce of P.
``comm_opt``: + (W−1)/W·F (bf16) per refresh + every part's fp32 preconditioner per inversion; every rank
preconditions every block. ``mem_opt``: + (P_blk + W)·4 directions every step + the parts drafted away from their
block owner per inversion. ``reduce_scatter`` (Osawa et al. 2019, arXiv:1811.12019 §4): block gradients reduce-
scattered to their owners and the fp32 directions all-gathered instead of the all-reduce; factors and moved parts as
``mem_opt``. FLOPs: 2·B·b²·n per side application (dense: 2·d_G·d_A·(d_G + d_A)), 2·k²·U per unit-wise block;
(10/3)·B·b³ per inverted part (Cholesky + triangular solve against I + GEMM, as ``linalg.InverseJob``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

# shapes only (meta device): DeepSpeed's CPU accelerator, without its "no GPU found" warning on stdout
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from ds_spngd import SPNGD  # noqa: E402
from ds_spngd.cost_model import MODES, CostSettings, mode_costs  # noqa: E402
from ds_spngd_lab.models import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"resnet50": ROOT / "ds_configs" / "spngd.json", "gpt2": ROOT / "ds_configs" / "spngd_gpt.json"}
COMM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def build(name: str) -> nn.Module:
    """ResNet-50 (1000 classes, 3 channels) or GPT-2 small, on the meta device."""
    with torch.device("meta"):
        if name == "resnet50":
            return build_model("resnet50", num_classes=1000, in_channels=3, image_size=224)
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12))


def grad_bytes(ds_config: dict[str, Any]) -> int:
    """Bytes per gradient element in DeepSpeed's reduction: 2 with bf16 or fp16 enabled, else 4."""
    half = any(isinstance(ds_config.get(k), dict) and ds_config[k].get("enabled", False) for k in ("bf16", "fp16"))
    return 2 if half else 4


def rows(name: str, worlds: list[int], args: argparse.Namespace) -> list[str]:
    """The table rows of one model."""
    ds_config = json.loads(CONFIGS[name].read_text(encoding="utf-8"))
    params = ds_config["optimizer"]["params"]
    model = build(name)
    opt = SPNGD(model.parameters(), model=model, config={
        "max_factor_dim": args.max_factor_dim, "large_dim_method": args.large_dim_method,
        "comm_dtype": args.comm_dtype, "inverse_method": params.get("inverse_method", "inverse"),
        "factor_update_steps": params.get("factor_update_steps", 1),
        "inv_update_steps": params.get("inv_update_steps", 1)})
    try:
        settings = CostSettings(grad_bytes=args.grad_bytes or grad_bytes(ds_config),
                                factor_bytes=COMM_BYTES[args.comm_dtype],
                                factor_update_steps=opt.cfg.factor_update_steps,
                                inv_update_steps=opt.cfg.inv_update_steps, method=opt.cfg.inverse_method)
        numel = sum(p.numel() for g in opt.param_groups for p in g["params"])
        label = (f"{name} ({numel / 1e6:.1f} M, {len(opt.blocks)} blocks, "
                 f"{sum(len(b.parts()) for b in opt.blocks)} parts, k={settings.factor_update_steps}/"
                 f"{settings.inv_update_steps}, grad {settings.grad_bytes} B)")
        out = []
        for world in worlds:
            costs = mode_costs(opt.blocks, numel, world, settings)
            sgd = costs["sgd"].amortized_bytes
            for mode in MODES:
                c = costs[mode]
                ratio = c.amortized_bytes / sgd if sgd > 0 else float("nan")
                lpt = (f"{c.imbalance:.2f} | {c.lpt_vs_bound:.2f} | {c.busy_ranks}" if mode != "sgd"
                       else "– | – | –")
                out.append(f"| {label} | {world} | {mode} | {c.amortized_bytes / 2**20:.1f} | {ratio:.3f} "
                           f"| {c.peak_bytes / 2**20:.1f} | {c.precondition_flops / 1e9:.2f} "
                           f"| {c.inversion_flops / 1e9:.1f} | {lpt} |")
                label = ""
        return out
    finally:
        opt.remove_hooks()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[8, 64, 1024])
    p.add_argument("--models", nargs="+", choices=sorted(CONFIGS), default=["resnet50", "gpt2"])
    p.add_argument("--max-factor-dim", type=int, default=4096)
    p.add_argument("--large-dim-method", choices=["block", "diagonal"], default="block")
    p.add_argument("--comm-dtype", choices=sorted(COMM_BYTES), default="bf16", help="factor payload dtype")
    p.add_argument("--grad-bytes", type=int, default=None,
                   help="bytes per gradient element (default: 2 when the config enables bf16/fp16, else 4)")
    args = p.parse_args(argv)
    print("| model | ranks | mode | MiB/rank/step (amortized) | × SGD | MiB on a refresh+inversion step "
          "| precond. GFLOP/step, busiest rank | inversion GFLOP/inv. step, busiest rank "
          "| LPT max/mean load | LPT max/lower bound | ranks owning parts |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for line in rows(name, args.worlds, args):
            print(line)


if __name__ == "__main__":
    main()
