"""One gloo rank of tests/integrations/test_checkpoint_faults.py: save SP-NGD checkpoints, or load (faulted) ones.

Run as (rank environment from tests/support/harness.rank_env)::

    python tests/support/checkpoint_fault_worker.py OUT save
    python tests/support/checkpoint_fault_worker.py OUT load CASES_JSON

* ``save``: a 2-layer MLP (Fisher blocks "0", "2") with SP-NGD at ZeRO 0 trains one step and saves tag ``s1`` into
  ``OUT/a``, a second step and saves tag ``good`` (``OUT/a/latest`` → ``good``); a 3-layer MLP (blocks "0", "2", "4",
  another model) trains one step and saves tag ``good`` into ``OUT/b``.
* ``load``: per case ``{"name", "dirs": [load dir of rank 0, of rank 1, ...], "tag": str | null, "optim": bool}``
  a fresh 2-layer engine (other initial weights) calls ``load_checkpoint(dir, tag, load_optimizer_states=optim)``;
  on success it trains one more step. Each case is recorded even when the load raises, and the next case runs.

Records: ``OUT/rank<r>.json`` (rewritten after each case): per case either ``{"error": class name, "classes": the
class and its bases, "message", "files", "ranks", "seconds", "untouched": the weights, the step counter and the
factors are as before the call}`` or ``{"path", "steps_loaded", "steps_after",
"loss", "seconds"}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import deepspeed
import torch
import torch.nn.functional as F
from torch import nn

import ds_spngd
from tests.support.harness import teardown, write_json

BATCH = 8


def make_model(layers: int, seed: int) -> nn.Module:
    """Linear(6, 8) → ReLU → ... → Linear(8, 3) with ``layers`` Linear layers (Fisher blocks "0", "2", ...)."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = [nn.Linear(6, 8)]
    for _ in range(layers - 2):
        mods += [nn.ReLU(), nn.Linear(8, 8)]
    return nn.Sequential(*mods, nn.ReLU(), nn.Linear(8, 3))


def build(layers: int, seed: int, world: int) -> tuple[Any, Any]:
    """(engine, SP-NGD) of a fresh model at ZeRO 0, fp32."""
    model = make_model(layers, seed)
    config = {"train_batch_size": BATCH, "train_micro_batch_size_per_gpu": BATCH // world,
              "gradient_accumulation_steps": 1, "gradient_clipping": 0.0, "zero_optimization": {"stage": 0},
              "optimizer": {"type": "SPNGD", "params": {"lr": 0.1, "momentum": 0.9, "damping": 0.03,
                                                        "factor_update_steps": 1, "inv_update_steps": 1}}}
    engine, _, _, _ = ds_spngd.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine, ds_spngd.get_spngd(engine)


def train_step(engine: Any, step: int, rank: int, world: int) -> float:
    """One optimizer step on this rank's share of the fixed batch of ``step``; this rank's loss."""
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(BATCH, 6, generator=gen), torch.randint(0, 3, (BATCH,), generator=gen)
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    loss = F.cross_entropy(engine(x[share]), y[share])
    engine.backward(loss)
    engine.step()
    return float(loss)


def save(out: str, rank: int, world: int) -> None:
    engine, _ = build(2, 0, world)
    train_step(engine, 0, rank, world)
    engine.save_checkpoint(os.path.join(out, "a"), tag="s1")
    train_step(engine, 1, rank, world)
    engine.save_checkpoint(os.path.join(out, "a"), tag="good")
    other, _ = build(3, 0, world)
    train_step(other, 0, rank, world)
    other.save_checkpoint(os.path.join(out, "b"), tag="good")
    write_json(os.path.join(out, f"rank{rank}.json"), {"saved": True})


def load_case(case: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """Load one case into a fresh engine; what happened."""
    engine, spngd = build(2, 1, world)
    before = [p.detach().clone() for p in engine.module.parameters()]
    start = time.monotonic()
    try:
        path, _ = engine.load_checkpoint(case["dirs"][rank], case["tag"], load_optimizer_states=case["optim"])
    except Exception as err:  # noqa: BLE001 - recorded for the test
        untouched = spngd.steps == 0 and all(f.value is None for b in spngd.blocks for f in b.factors) and all(
            torch.equal(p, q) for p, q in zip(before, engine.module.parameters(), strict=True))
        return {"error": type(err).__name__, "classes": [c.__name__ for c in type(err).__mro__],
                "message": str(err), "files": list(getattr(err, "files", [])),
                "ranks": list(getattr(err, "ranks", [])), "seconds": time.monotonic() - start,
                "untouched": untouched}
    seconds = time.monotonic() - start
    steps_loaded = int(spngd.steps)
    loss = train_step(engine, 2, rank, world)
    return {"path": path, "steps_loaded": steps_loaded, "steps_after": int(spngd.steps), "loss": loss,
            "seconds": seconds}


def main(argv: list[str]) -> None:
    out, phase = argv[0], argv[1]
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if phase == "save":
        save(out, rank, world)
    else:
        records: dict[str, Any] = {}
        for case in json.loads(argv[2]):
            records[case["name"]] = load_case(case, rank, world)
            write_json(os.path.join(out, f"rank{rank}.json"), records)
    teardown()


if __name__ == "__main__":
    main(sys.argv[1:])
