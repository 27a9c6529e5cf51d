"""ZeRO 2 and 3 with ``comm_opt`` on 2 gloo ranks: the blocks' gradients all-gathered from the partitions
(ZeRO 2: :mod:`ds_spngd.comm.fragments`; ZeRO 3: each parameter's equal pieces) equal the all-reduce of zero-padded
fragments, and training with them gives the same parameters, bit for bit.

The model is train_lm.py's GPT in miniature (tied embedding / head, RMSNorm, fused qkv), fp32 and bf16. Each rank
runs this file as a script (``python test_zero_gather.py OUT PRECISION STAGE``): two engines from the same weights and
data, one with the all-gather and one forced to the all-reduce (``PartitionedGradients.gather = False``); every call
of ``block_grads`` on the first also runs the all-reduce and compares.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import free_port, rank_env, remove_shm_buffers, run_procs

STEPS = 5


def _engine(bf16: bool, stage: int) -> tuple[Any, Any]:
    import torch

    import ds_spngd
    from ds_spngd_lab.models.gpt import build_lm

    torch.manual_seed(0)
    model = build_lm("gpt", 40, 2, 2, 16, 8)
    cfg: dict[str, Any] = {
        "train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}, "steps_per_print": 10**9,
        "bf16": {"enabled": bf16},
        "optimizer": {"type": "SPNGD", "params": {"lr": 0.05, "momentum": 0.9, "damping": 0.1, "kl_clip": 0.01,
                                                  "factor_update_steps": 2, "inv_update_steps": 2}}}
    engine, _, _, _ = ds_spngd.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
    return engine, ds_spngd.get_spngd(engine)


def _worker(out: Path, precision: str, stage: int) -> None:
    import deepspeed
    import torch
    import torch.nn.functional as F

    from tests.support.harness import teardown

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    engines = [_engine(precision == "bf16", stage) for _ in range(2)]
    gathered, reduced = engines[0][1].grads, engines[1][1].grads
    reduced.gather = False  # the all-reduce, for reference
    import ds_spngd.integrations.deepspeed.zero as zero

    gather_calls = [0]
    gather_flats = zero.gather_flats

    def counted(*a: Any, **k: Any) -> Any:
        gather_calls[0] += 1
        return gather_flats(*a, **k)

    zero.gather_flats = counted  # type: ignore[assignment]
    checks: list[dict[str, Any]] = []
    plain = gathered.block_grads

    def compared(ids: Any, owners: Any, group: Any) -> Any:
        before = gather_calls[0]
        got, sent = plain(ids, owners, group)
        via_gather = gather_calls[0] > before
        gathered.gather = False
        try:
            want, sent_ref = plain(ids, owners, group)
        finally:
            gathered.gather = True
        same = got.keys() == want.keys() and all(torch.equal(a, b) for i in got
                                                 for a, b in zip(got[i], want[i], strict=True))
        checks.append({"blocks": len(got), "same": same, "sent": sent, "sent_allreduce": sent_ref,
                       "via_gather": via_gather})
        return got, sent

    gathered.block_grads = compared
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        x = torch.randint(0, 40, (4, 8), generator=gen)
        y = torch.randint(0, 40, (4, 8), generator=gen)
        for engine, _ in engines:
            loss = F.cross_entropy(engine(x).float().reshape(-1, 40), y.reshape(-1))
            engine.backward(loss)
            engine.step()
    params = []
    for e, _ in engines:
        with deepspeed.zero.GatheredParameters(list(e.module.parameters()), enabled=stage == 3):
            params.append([p.detach().float().clone() for p in e.module.parameters()])
    same_params = all(torch.equal(a, b) for a, b in zip(*params, strict=True))
    covered = all(c["via_gather"] for c in checks if c["blocks"])  # the all-gather really ran (every block)
    (out / f"rank{rank}.json").write_text(json.dumps({"checks": checks, "same_params": same_params,
                                                      "covered": covered, "steps": engines[0][1].steps}))
    teardown()


@pytest.mark.parametrize(("precision", "stage"), [("fp32", 2), ("bf16", 2), ("fp32", 3), ("bf16", 3)])
def test_gathered_gradients_equal_the_all_reduce(tmp_path: Path, precision: str, stage: int) -> None:
    port = free_port()
    try:
        results = run_procs([[sys.executable, __file__, str(tmp_path), precision, str(stage)]] * 2,
                            [rank_env(r, 2, port) for r in range(2)], 300.0, tmp_path / "logs")
    finally:
        remove_shm_buffers(port)
    for r, res in enumerate(results):
        assert res.returncode == 0, f"rank {r} {res.status()}:\n{res.tail(4000)}"
    for r in range(2):
        rec = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert rec["steps"] == STEPS and rec["covered"], rec
        used = [c for c in rec["checks"] if c["blocks"]]
        assert used and all(c["same"] for c in used), rec["checks"]
        assert all(c["sent"] < c["sent_allreduce"] * 1.5 for c in used)  # the gathered flat, not 2 copies
        assert rec["same_params"], "training with the all-gather left other parameters than with the all-reduce"


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
