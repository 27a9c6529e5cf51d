"""Per-block owners for blocked sides: each diagonal block of a side beyond ``max_factor_dim`` is its own factor,
reduced to and inverted by its own owner rank (ds_spngd/curvature/side.py, ds_spngd/comm/inversion.py).

* the plan: GPT-2-small's 50257-wide tied head (13 blocks of 3866) is spread over the ranks instead of landing on one,
  and the largest per-rank inversion load drops accordingly (LPT over parts, built on the meta device);
* the update: tests/support/worker/'s net with ``max_factor_dim`` 6 (both sides of its 144→16 Linear chunked, padded
  last blocks) on 2 and 3 ranks through DeepSpeed — comm_opt and mem_opt, inverse and eigen, ZeRO-2 — equals the
  1-rank run, whose blocked update is checked against the dense Kronecker solve in test_tied_and_large.py;
* a fault: a chunk's owner whose draft fails ends the step with the same error on every rank, nothing updated.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ds_spngd import SPNGD
from ds_spngd.comm.assignment import block_cost
from ds_spngd.comm.inversion import plan_parts
from ds_spngd.curvature.side import ChunkedSide
from ds_spngd.curvature.tied import TiedBlock
from tests.support.ranks import launch

BASE = {"gas": 1, "bf16": False, "inverse_method": "inverse", "steps": 6, "max_factor_dim": 6}
FULL = {**BASE, "steps": 8, "kl_clip": 0.05, "weight_rescale": True}
CASES = {
    "ref": BASE,
    "eigen": {**BASE, "inverse_method": "eigen"},
    "mem": {**BASE, "mode": "mem_opt"},
    "mem_eigen": {**BASE, "mode": "mem_opt", "inverse_method": "eigen"},
    "z2_mem": {**FULL, "zero": 2, "mode": "mem_opt"},
    "z2": {**FULL, "zero": 2},
    "fault": {**BASE, "inject": {"kind": "inversion", "rank": 1, "step": 2}},
}
REF = {"ref": "ref", "eigen": "eigen", "mem": "ref", "mem_eigen": "eigen", "z2_mem": "z2", "z2": "z2"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, dict]]:
    base = tmp_path_factory.mktemp("parts")
    out = {}
    for world, names in ((1, ["ref", "eigen", "z2"]), (2, list(CASES)), (3, ["ref", "mem", "mem_eigen", "z2_mem"])):
        out[world] = dict(zip(names, launch(world, [CASES[n] for n in names], base / f"w{world}"), strict=True))
    return out


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    torch.testing.assert_close(b, a, rtol=0.0, atol=rtol * float(a.abs().max()))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", ["ref", "eigen", "mem", "mem_eigen", "z2_mem", "z2"])
def test_parts_on_several_ranks_equal_one_rank(runs: dict, name: str, world: int) -> None:
    """w ranks, the chunks of one side owned by different ranks == 1 rank, every step."""
    if name not in runs[world]:
        pytest.skip(f"{name} runs on 2 ranks only")
    got, ref = runs[world][name], runs[1][REF[name]]
    owners = got["ranks"][0]["part_owners"]
    chunks = {k: v for k, v in owners.items() if k.startswith("3#")}  # the 144→16 Linear: 25 + 3 parts
    assert len(chunks) == 28 and len(set(chunks.values())) == world, owners  # really spread over every rank
    assert all(rec["error"] is None for rec in got["ranks"])
    _close(ref["params"], got["params"], 5e-5 if "eigen" in name else 1e-5)
    for rec in got["ranks"][1:]:  # identical replicas
        assert all(torch.equal(a, b) for a, b in zip(rec["params"], got["ranks"][0]["params"], strict=True))


def test_a_failing_chunk_owner_stops_every_rank_alike(runs: dict) -> None:
    ranks = runs[2]["fault"]["ranks"]
    errors = [rec["error"] for rec in ranks]
    assert all(e is not None and e["step"] == 2 for e in errors), errors
    assert len({e["message"] for e in errors}) == 1 and "rank 1" in errors[0]["message"], errors
    for rec in ranks:
        assert torch.equal(rec["error"]["params"], rec["params"][1])  # nothing moved at the failing step


def _gpt2_small_on_meta() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2))


def test_gpt2_head_chunks_spread_over_ranks() -> None:
    """The 13 blocks of the 50257-wide V-side (and their token counts) get one part each; on 8 ranks LPT puts them
    on every rank, and no rank's inversion load exceeds one chunk plus the rest of the model's share."""
    model = _gpt2_small_on_meta()
    opt = SPNGD(model.parameters(), model=model, config={})
    tied = next(b for b in opt.blocks if isinstance(b, TiedBlock))
    assert isinstance(tied.g, ChunkedSide) and isinstance(tied.e, ChunkedSide)
    parts = tied.parts()
    assert len(parts) == 1 + 13
    assert [f.name for f in parts[1]] == ["lm_head.G[0]", "lm_head.E[0]"]
    assert sorted(f.name for p in parts for f in p) == sorted(f.name for f in tied.factors)  # a partition
    plan = plan_parts(opt.blocks, 8)
    head = [plan.owners[j] for j, (i, k) in enumerate(plan.jobs) if opt.blocks[i] is tied and k > 0]
    assert len(set(head)) == 8
    chunk = block_cost([(1, 3866)])
    whole = sum(block_cost([(f.blocks, f.dim) for f in p]) for b in opt.blocks for p in b.parts())
    assert max(plan.assignment.loads) <= max(whole / 8, 0.0) + chunk  # LPT: mean + the largest job at most
    assert max(plan.assignment.loads) < 13 * chunk / 2  # one owner for the head would carry all 13
    factor_owners = plan.factor_owners(opt.blocks)
    assert len(factor_owners) == sum(len(b.factors) for b in opt.blocks)
