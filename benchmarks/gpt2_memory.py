"""SP-NGD's curvature memory per rank for GPT-2-small shapes (vocab 50257, width 768, 12 layers, tied embedding /
output weight), built on the meta device: nothing is allocated, the figures come from the shapes
(:func:`ds_spngd.memory.memory_plan`, planned for 1 / 8 / 64 data-parallel ranks with the same LPT owner rule as a run).

Usage::

    python benchmarks/gpt2_memory.py [--worlds 1 8 64] [--max-factor-dim 4096] [--layers 12]

Prints one markdown row per (precondition_mode, large_dim_method, world): the busiest rank's total and its
categories in GiB, and the largest factor side held densely (no dense 50257² matrix is ever planned). The
"curvature" column is the total without momentum (which any momentum optimizer holds). The last two columns are the
busiest rank's inversion work per inversion step (Σ B·d³ of the factors it inverts, in units of 10⁹) with one owner
per block part (a diagonal block of a blocked side is a part of its own) and, side by side from the same shapes,
with one owner per whole layer (the LPT rule over layers).
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from ds_spngd import SPNGD
from ds_spngd.comm.assignment import assign_owners, block_cost
from ds_spngd.comm.inversion import plan_parts
from ds_spngd.memory import CATEGORIES, memory_plan


def build(layers: int) -> torch.nn.Module:
    """GPT-2 small (or ``layers`` deep) on the meta device."""
    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=layers, n_head=12))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--max-factor-dim", type=int, default=4096)
    p.add_argument("--layers", type=int, default=12)
    args = p.parse_args(argv)
    model = build(args.layers)
    gib = 2.0**30
    print("| mode | large_dim_method | ranks | curvature GiB (busiest rank) | " + " | ".join(CATEGORIES)
          + " | largest dense side | inversion work, busiest rank: per part / per layer (1e9 B·d³) |")
    print("|---|---|---|---|" + "---|" * len(CATEGORIES) + "---|---|")
    for mode in ("comm_opt", "mem_opt"):
        for method in ("block", "diagonal"):
            opt = SPNGD(model.parameters(), model=model, config={
                "precondition_mode": mode, "max_factor_dim": args.max_factor_dim, "large_dim_method": method,
                "comm_dtype": "bf16", "momentum": 0.9})
            largest = max(f.dim for b in opt.blocks for f in b.factors)
            for world in args.worlds:
                plans = [memory_plan(opt, r, world=world) for r in range(world)]
                worst = max(plans, key=lambda q: q["total"] - q["momentum"])
                cats = " | ".join(f"{worst[k] / gib:.3f}" for k in CATEGORIES)
                per_part = max(plan_parts(opt.blocks, world).assignment.loads) / 1e9
                per_layer = max(assign_owners([block_cost([(f.blocks, f.dim) for f in b.factors]) for b in opt.blocks],
                                              world).loads) / 1e9
                print(f"| {mode} | {method} | {world} | {(worst['total'] - worst['momentum']) / gib:.3f} | {cats} "
                      f"| {largest} | {per_part:.1f} / {per_layer:.1f} |")
            opt.remove_hooks()


if __name__ == "__main__":
    main()
