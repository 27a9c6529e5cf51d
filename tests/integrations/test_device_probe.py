"""Device discipline, checked without a GPU: the default-device probe.

NCCL takes CUDA tensors only, so every tensor SP-NGD allocates must live on its parameters' device. On a CPU machine
a slip is invisible — unless the default device is something else: with ``torch.set_default_device("meta")`` every
tensor created without naming a device lands on "meta", and the first time it meets real data (a collective, a
``cat`` with a real factor, ``.tolist()``) the step fails. tests/support/worker/ runs the real DeepSpeed engine that
way ("meta" cases: the model and engine are built normally, then every step — forward, backward, SP-NGD's step,
DeepSpeed's own — and the checkpoint round trip run under the probe) at world sizes 1, 2 and 3, over the code paths
that allocate: factor refresh and inversion steps, comm_opt and mem_opt, overlap on and off, a module whose hooks
never fire (its zero contribution), one whose hooks fire on one rank only, KL-clipping and weight rescaling,
save_checkpoint → load_checkpoint → step, ZeRO 1/2, bf16 at stages 0 and 2 (DeepSpeed's own code runs under the probe
at all of them).

Every probed run must (1) finish and (2) give bitwise the parameters of the same run without the probe (the probe
changes where an unnamed tensor lands, nothing else). The canary case plants a slip (a factor's zero contribution
created without a device, the bug the probe exists for) and must fail. On the code before this test was written the
probe failed at the first refresh step (``comm/factor_reduction.py``: the contribution flags' ``torch.tensor``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.support.ranks import launch_worlds

FULL = {"gas": 1, "bf16": False, "inverse_method": "inverse", "steps": 5, "kl_clip": 0.05, "weight_rescale": True}
PROBED = {
    "comm_opt": FULL,
    "mem_opt": {**FULL, "mode": "mem_opt"},
    "eigen_gas2": {**FULL, "inverse_method": "eigen", "gas": 2},
    "no_overlap": {**FULL, "overlap": False},
    "never_fires": {**FULL, "extra": "never"},
    "resume": {**FULL, "steps": 6, "resume_at": 3},
    "resume_mem": {**FULL, "steps": 6, "resume_at": 3, "mode": "mem_opt"},
    "zero1": {**FULL, "zero": 1},
    "zero2_mem": {**FULL, "zero": 2, "mode": "mem_opt"},
    "bf16": {**FULL, "bf16": True, "damping": 0.3},
    "bf16_zero2": {**FULL, "bf16": True, "damping": 0.3, "zero": 2},
    "zero3_mem": {**FULL, "zero": 3, "mode": "mem_opt"},
    "bf16_zero3_resume": {**FULL, "bf16": True, "damping": 0.3, "zero": 3, "steps": 6, "resume_at": 3},
}
MULTI = {"rank0_only": {**FULL, "extra": "rank0"}}  # hooks that fire on rank 0 only need two ranks
CANARY = {**FULL, "steps": 2, "extra": "never", "canary": True}


def _cases(world: int) -> dict[str, dict]:
    base = {**PROBED, **(MULTI if world > 1 else {})}
    cases = {f"{k}@meta": {**v, "meta": True} for k, v in base.items()}
    cases.update({f"{k}@cpu": v for k, v in base.items()})
    cases["canary@meta"] = {**CANARY, "meta": True}
    cases["canary@cpu"] = CANARY
    return cases


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, dict]]:
    """Each world's cases in two launches: the ZeRO-3 ones in processes of their own. DeepSpeed's ZeRO-3 engine
    leaves process-wide state behind (measured: a ZeRO-2 case run after a ZeRO-3 one in the same process differs
    from its twin in the last bits at 3 ranks), which would break the bitwise meta-vs-cpu comparison."""
    base = tmp_path_factory.mktemp("probe")
    out: dict[int, dict[str, dict]] = {}
    for w in (1, 2, 3):
        cases = _cases(w)
        z3 = {k: v for k, v in cases.items() if v.get("zero") == 3}
        out[w] = {**launch_worlds((w,), {k: v for k, v in cases.items() if k not in z3}, base / "z012")[w],
                  **launch_worlds((w,), z3, base / "z3")[w]}
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("name", [*PROBED, *MULTI])
def test_every_path_runs_under_the_default_device_probe(runs: dict, world: int, name: str) -> None:
    if name in MULTI and world == 1:
        pytest.skip("needs two ranks")
    probed, plain = runs[world][f"{name}@meta"], runs[world][f"{name}@cpu"]
    for r, rec in enumerate(probed["ranks"]):
        err = rec["error"]
        assert err is None, f"rank {r} failed under the probe at step {err['step']}: {err['trace']}"
        assert len(rec["params"]) == (PROBED | MULTI)[name]["steps"]
    for r, (a, b) in enumerate(zip(probed["ranks"], plain["ranks"], strict=True)):
        assert b["error"] is None
        for step, (pa, pb) in enumerate(zip(a["params"], b["params"], strict=True)):
            assert torch.isfinite(pa).all()
            assert torch.equal(pa, pb), f"rank {r} step {step}: the probe changed the result"
    moved = probed["ranks"][0]["params"]
    assert float((moved[-1] - moved[0]).abs().max()) > 1e-4  # the run really trained


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_probe_catches_a_planted_device_slip(runs: dict, world: int) -> None:
    """Guards the test above: the same worker with a factor zero-contribution created without a device fails under
    the probe on every rank (and runs fine without it, so it is the slip that fails)."""
    for rec in runs[world]["canary@meta"]["ranks"]:
        assert rec["error"] is not None and rec["error"]["step"] == 0
    for rec in runs[world]["canary@cpu"]["ranks"]:
        assert rec["error"] is None


def test_loaded_state_moves_to_the_blocks_device(tmp_path: Path) -> None:
    """load_state_dict / load_sharded_state put factors, preconditioners and momentum on the blocks' device (here
    "meta", the only second device a CPU machine has), whatever device and dtype the checkpoint was saved from."""
    import torch.nn.functional as F
    from torch import nn

    from ds_spngd import SPNGD

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))

    src = net()
    opt = SPNGD(src.parameters(), model=src, config={"lr": 0.1})
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(src(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
        opt.step()
    sd = opt.state_dict()
    for block in sd["spngd"]["blocks"].values():  # as if saved from another precision
        block["preconditioner"] = [t.double() for t in block["preconditioner"]]
    torch.save(sd, tmp_path / "opt.pt")
    dst = net().to("meta")
    opt2 = SPNGD(dst.parameters(), model=dst, config={"lr": 0.1})
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", map_location="cpu", weights_only=False))
    for b in opt2.blocks:
        for f in b.factors:
            assert f.value is not None and f.value.device.type == "meta" and f.value.dtype == torch.float32
        assert all(t.device.type == "meta" and t.dtype == torch.float32 for t in b.preconditioner_tensors())
    assert all(s["momentum_buffer"].device.type == "meta" for s in opt2.state.values())
