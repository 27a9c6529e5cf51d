"""DecentLaM and DmSGD as DeepSpeed optimizer types (ds_spngd/integrations/deepspeed/decentralized*.py), checked
against the update rules of Yuan et al., ICCV 2021 (arXiv:2104.11981), not against the implementation.

One worker launch per world size (2, 3, 4 gloo CPU ranks, tests/support/decentralized_worker.py) trains a tiny model
with different data on every rank and records every rank's parameters after every step. Here the paper's recursions
are recomputed in one process, in float64, with every rank's model simulated and the mixing matrices written out by
hand below (independently of ``mixing_matrix``):

* DmSGD (eq. (3)): ``m_i ← β m_i + g_i``; ``x_i ← Σ_j w_ij (x_j − γ m_j)``;
* DecentLaM (Algorithm 1): ``g̃_i = (x_i − Σ_j w_ij (x_j − γ g_j))/γ``; ``m_i ← β m_i + g̃_i``; ``x_i ← x_i − γ m_i``
  (γ = 0: ``x_i ← Σ_j w_ij x_j``, ``m_i ← β m_i + Σ_j w_ij g_j``);

and compared with every rank's recorded parameters (relative tolerance 2e-6: fp32 against float64; 1e-2 for the
bf16 case, whose module weights are bf16 roundings of the wrapper's fp32 copies). Also: the
complete graph equals ``torch.optim.SGD`` on the averaged gradient, DecentLaM and DmSGD part from the third step on,
every topology's matrix is doubly stochastic, the per-rank checkpoint resumes every replica exactly, the consensus
model is the average, and config errors name the key.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from ds_spngd.integrations.deepspeed.decentralized import (
    TOPOLOGIES,
    check_doubly_stochastic,
    mixing_matrix,
)
from ds_spngd.integrations.deepspeed.decentralized_engine import DecentralizedConfigError, parse_decentralized
from tests.support.decentralized_worker import batch, build_model, loss_fn
from tests.support.harness import ROOT, free_port, rank_env, remove_shm_buffers, run_procs

WORKER = ROOT / "tests" / "support" / "decentralized_worker.py"
TOL = 2e-6
T = 1.0 / 3.0
H = 0.5
# W[i][j]: the weight rank i gives rank j's vector; written from the topology definitions, not from the library
HAND: dict[tuple[str, int, int], list[list[float]]] = {
    ("ring", 4, 0): [[T, T, 0, T], [T, T, T, 0], [0, T, T, T], [T, 0, T, T]],
    ("exponential", 4, 0): [[T, 0, T, T], [T, T, 0, T], [T, T, T, 0], [0, T, T, T]],  # from i, i−1, i−2
    ("one_peer_exponential", 4, 0): [[H, 0, 0, H], [H, H, 0, 0], [0, H, H, 0], [0, 0, H, H]],  # from i−1
    ("one_peer_exponential", 4, 1): [[H, 0, H, 0], [0, H, 0, H], [H, 0, H, 0], [0, H, 0, H]],  # from i−2
    ("one_peer_exponential", 3, 0): [[H, 0, H], [H, H, 0], [0, H, H]],  # from i−1
    ("one_peer_exponential", 3, 1): [[H, H, 0], [0, H, H], [H, 0, H]],  # from i−2 = i+1
    ("one_peer_exponential", 2, 0): [[H, H], [H, H]],
}


def hand_matrix(topology: str, n: int, step: int) -> torch.Tensor:
    """The hand-written W of a topology (complete graphs: J/n; rings and exponential graphs of 2 and 3 ranks are
    complete; one-peer graphs alternate with period ⌈log2 n⌉)."""
    if topology == "complete" or (topology in ("ring", "exponential") and n <= 3):
        return torch.full((n, n), 1.0 / n, dtype=torch.float64)
    period = 1 if n == 2 else 2
    key = (topology, n, step % period if topology == "one_peer_exponential" else 0)
    return torch.tensor(HAND[key], dtype=torch.float64)


def case(name: str, type_: str, topology: str, **kw: Any) -> dict[str, Any]:
    base = {"name": name, "type": type_, "topology": topology, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01,
            "steps": 5, "micro": 4, "gas": 1, "scheduler": None, "checkpoint": False, "consensus": False, "bf16": False}
    return {**base, **kw}


WARMUP = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.1, "warmup_num_steps": 2,
                                         "warmup_type": "linear"}}  # fmt: skip
CASES: dict[int, list[dict[str, Any]]] = {
    2: [case("decentlam_ring", "DecentLaM", "ring"), case("dmsgd_ring", "DmSGD", "ring"),
        case("decentlam_complete", "DecentLaM", "complete"), case("dmsgd_complete", "dmsgd", "complete")],
    3: [case("decentlam_one_peer_gas2", "DecentLaM", "one_peer_exponential", gas=2, micro=2),
        case("dmsgd_one_peer", "DmSGD", "one_peer_exponential"), case("decentlam_exponential", "DecentLaM",
                                                                       "exponential")],
    4: [case("decentlam_ring", "DecentLaM", "ring", consensus=True), case("dmsgd_ring", "DmSGD", "ring"),
        case("decentlam_exponential", "DecentLaM", "exponential"), case("dmsgd_exponential", "DmSGD", "exponential"),
        case("decentlam_one_peer", "DecentLaM", "one_peer_exponential"),
        case("decentlam_complete", "DecentLaM", "complete"),
        case("decentlam_warmup", "DecentLaM", "ring", scheduler=WARMUP),
        case("dmsgd_ring_checkpoint", "DmSGD", "ring", checkpoint=True, steps=4),
        case("decentlam_ring_checkpoint", "DecentLaM", "ring", checkpoint=True, steps=4),
        case("decentlam_ring_bf16_checkpoint", "DecentLaM", "ring", checkpoint=True, steps=4, bf16=True)],
}


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """{world: {case name: [rank 0's record, rank 1's, ...]}}: one worker launch per world size."""
    out: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for world, cases in CASES.items():
        d = tmp_path_factory.mktemp(f"decentralized_w{world}")
        port = free_port()
        cmd = [sys.executable, str(WORKER), str(d), json.dumps(cases)]
        try:
            results = run_procs([cmd] * world, [rank_env(r, world, port) for r in range(world)], 240.0, d / "logs")
        finally:
            remove_shm_buffers(port)
        for r, res in enumerate(results):
            assert res.returncode == 0 and not res.timed_out, f"w {world} rank {r} {res.status()}:\n{res.tail(3000)}"
        out[world] = {c["name"]: [torch.load(d / f"{c['name']}.r{r}.pt", weights_only=False) for r in range(world)]
                      for c in cases}  # fmt: skip
    return out


# ---- the reference: every rank simulated in one process, float64 ------------------------------------------------
def _grad_fn(c: dict[str, Any]) -> Callable[[int, int, torch.Tensor], torch.Tensor]:
    """g(rank, step, x): rank's mean gradient over its micro-batches of that step at flat parameters x (float64)."""
    model = build_model(torch.float64)

    def grad(rank: int, step: int, x: torch.Tensor) -> torch.Tensor:
        nn.utils.vector_to_parameters(x.clone(), model.parameters())
        model.zero_grad()
        for micro in range(c["gas"]):
            xb, yb = batch(rank, step, micro, c["micro"], torch.float64)
            (loss_fn(model(xb), yb) / c["gas"]).backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).detach()

    return grad


def _mix(w: torch.Tensor, v: list[torch.Tensor]) -> list[torch.Tensor]:
    """[Σ_j w_ij v_j for each i]."""
    return [sum((w[i, j] * v[j] for j in range(len(v))), torch.zeros_like(v[0])) for i in range(len(v))]


def simulate(c: dict[str, Any], n: int, init: torch.Tensor, lrs: list[float], rule: str) -> list[list[torch.Tensor]]:
    """Every rank's parameters after each step under ``rule`` ("dmsgd" | "decentlam"), from identical replicas."""
    grad, beta, wd = _grad_fn(c), c["momentum"], c["weight_decay"]
    x = [init.double().clone() for _ in range(n)]
    m = [torch.zeros_like(x[0]) for _ in range(n)]
    out = []
    for k, lr in enumerate(lrs):
        w = hand_matrix(c["topology"], n, k)
        g = [grad(i, k, x[i]) + wd * x[i] for i in range(n)]
        if rule == "dmsgd":  # eq. (3)
            m = [beta * m[i] + g[i] for i in range(n)]
            x = _mix(w, [x[j] - lr * m[j] for j in range(n)])
        elif lr > 0:  # Algorithm 1
            z = _mix(w, [x[j] - lr * g[j] for j in range(n)])
            m = [beta * m[i] + (x[i] - z[i]) / lr for i in range(n)]
            x = [x[i] - lr * m[i] for i in range(n)]
        else:  # γ = 0: the limit the module documents
            wg = _mix(w, g)
            m = [beta * m[i] + wg[i] for i in range(n)]
            x = _mix(w, x)
        out.append([xi.clone() for xi in x])
    return out


def sgd_reference(c: dict[str, Any], n: int, init: torch.Tensor) -> list[torch.Tensor]:
    """torch.optim.SGD (momentum β, weight decay λ) on the rank-averaged gradient: all-reduce momentum SGD."""
    grad = _grad_fn(c)
    p = nn.Parameter(init.double().clone())
    opt = torch.optim.SGD([p], lr=c["lr"], momentum=c["momentum"], weight_decay=c["weight_decay"])
    out = []
    for k in range(c["steps"]):
        p.grad = torch.stack([grad(i, k, p.detach()) for i in range(n)]).mean(dim=0)
        opt.step()
        out.append(p.detach().clone())
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def assert_follows(ranks: list[dict[str, Any]], expected: list[list[torch.Tensor]], what: str,
                   tol: float = TOL) -> None:
    for k, per_rank in enumerate(expected):
        for i, want in enumerate(per_rank):
            err = rel(ranks[i]["params"][k], want)
            assert err < tol, f"{what}: step {k + 1}, rank {i}: relative error {err:.2e}"


def _case(world: int, name: str) -> dict[str, Any]:
    return next(c for c in CASES[world] if c["name"] == name)


# ---- tests against the rule --------------------------------------------------------------------------------------
@pytest.mark.parametrize("world,name", [(w, c["name"]) for w, cs in CASES.items() for c in cs])
def test_every_rank_follows_the_papers_update_rule(records: dict, world: int, name: str) -> None:
    c, ranks = _case(world, name), records[world][name]
    assert not any(r["allreduce"] for r in ranks), "DeepSpeed's gradient all-reduce must be off"
    for r in ranks[1:]:
        assert torch.equal(r["init"], ranks[0]["init"]), "the engine starts from identical replicas"
    rule = "dmsgd" if c["type"].lower() == "dmsgd" else "decentlam"
    want = simulate(c, world, ranks[0]["init"], ranks[0]["lrs"], rule)
    assert_follows(ranks, want, f"{name} on {world} ranks", 1e-2 if c["bf16"] else TOL)  # bf16: weights rounded
    if c["topology"] not in ("complete",) and world == 4:
        final = [r["params"][-1] for r in ranks]
        assert max(rel(f, final[0]) for f in final[1:]) > 1e-3, "replicas should disagree on a sparse graph"


def test_the_warmup_reaches_lr_zero_and_follows_the_limit(records: dict) -> None:
    lrs = records[4]["decentlam_warmup"][0]["lrs"]
    assert lrs[0] == 0.0 and lrs[-1] == pytest.approx(0.1), lrs


@pytest.mark.parametrize("world,name", [(2, "decentlam_complete"), (2, "dmsgd_complete"), (2, "decentlam_ring"),
                                        (2, "dmsgd_ring"), (4, "decentlam_complete")])
def test_complete_graph_equals_allreduce_momentum_sgd(records: dict, world: int, name: str) -> None:
    """W = J/n (and a ring of 2, which is complete): every rank moves exactly like torch.optim.SGD on the averaged
    gradient."""
    c, ranks = _case(world, name), records[world][name]
    want = sgd_reference(c, world, ranks[0]["init"])
    assert_follows(ranks, [[w] * world for w in want], f"{name} vs SGD")


def test_decentlam_differs_from_dmsgd_from_the_third_step(records: dict) -> None:
    """Same data, ring of 4: identical for two steps (stacked: both give x² = W x¹ − γ W (β g⁰ + g¹)), then the
    momentum-mixing difference β (I − W) x¹ shows; each record is far from the other rule."""
    lam, dm = records[4]["decentlam_ring"], records[4]["dmsgd_ring"]
    for i in range(4):
        for k in (0, 1):
            assert rel(lam[i]["params"][k], dm[i]["params"][k]) < TOL
        assert rel(lam[i]["params"][4], dm[i]["params"][4]) > 1e-4
    c = _case(4, "decentlam_ring")
    other = simulate(c, 4, lam[0]["init"], lam[0]["lrs"], "dmsgd")
    assert rel(lam[0]["params"][4], other[4][0]) > 1e-4


def test_checkpoint_resumes_every_replica_exactly(records: dict) -> None:
    for name in ("dmsgd_ring_checkpoint", "decentlam_ring_checkpoint", "decentlam_ring_bf16_checkpoint"):
        ranks = records[4][name]
        assert ranks[0]["files"].count("mp_rank_00_model_states.pt") == 1
        assert all(f"decentralized_rank{r:05d}.pt" in ranks[0]["files"] for r in range(4))
        for i, r in enumerate(ranks):
            assert torch.equal(r["loaded"], r["params"][-2]), f"{name} rank {i}: not its own saved parameters"
            assert torch.equal(r["resumed"], r["params"][-1]), f"{name} rank {i}: the resumed step differs"
        assert not torch.equal(ranks[1]["loaded"], ranks[0]["loaded"])


def test_consensus_parameters_are_the_average_and_are_restored(records: dict) -> None:
    ranks = records[4]["decentlam_ring"]
    mean = sum(r["params"][-1].double() for r in ranks) / 4
    for r in ranks:
        assert rel(r["consensus"], mean) < 1e-6
        assert torch.equal(r["after_consensus"], r["params"][-1])


# ---- the mixing matrices -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_every_mixing_matrix_is_doubly_stochastic(topology: str) -> None:
    for n in range(1, 10):
        for step in range(4):
            check_doubly_stochastic(mixing_matrix(topology, n, step), f"{topology} n={n}")


@pytest.mark.parametrize("topology,n,step", [(t, n, k) for t in TOPOLOGIES for n in (2, 3, 4) for k in range(3)])
def test_mixing_matrix_matches_the_hand_written_one(topology: str, n: int, step: int) -> None:
    assert torch.allclose(mixing_matrix(topology, n, step), hand_matrix(topology, n, step), atol=1e-15)


def test_a_matrix_that_is_not_doubly_stochastic_is_refused() -> None:
    with pytest.raises(ValueError, match="column sums"):
        check_doubly_stochastic(torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="negative"):
        check_doubly_stochastic(torch.tensor([[1.5, -0.5], [-0.5, 1.5]], dtype=torch.float64))


# ---- config errors -----------------------------------------------------------------------------------------------
def _cfg(params: dict[str, Any] | None = None, type_: str = "DecentLaM", **top: Any) -> dict[str, Any]:
    return {"train_batch_size": 8, "optimizer": {"type": type_, "params": params or {}}, **top}


@pytest.mark.parametrize("cfg,key", [
    (_cfg({"momentum": 1.0}), "optimizer.params.momentum"),
    (_cfg({"topology": "star"}), "optimizer.params.topology"),
    (_cfg({"lr": 0}), "optimizer.params.lr"),
    (_cfg({"lr": True}), "optimizer.params.lr"),
    (_cfg({"nesterov": True}, "DmSGD"), "optimizer.params.nesterov"),
    ({**_cfg(), "optimizer": {"type": "DmSGD", "params": {}, "impl": "x"}}, "optimizer.impl"),
    (_cfg(zero_optimization={"stage": 1}), "zero_optimization.stage"),
    (_cfg(fp16={"enabled": True}), "fp16.enabled"),
    (_cfg(gradient_noise_scale={"enabled": True}), "gradient_noise_scale.enabled"),
])  # fmt: skip
def test_config_errors_name_the_key(cfg: dict[str, Any], key: str) -> None:
    with pytest.raises(DecentralizedConfigError, match=key.replace(".", r"\.")):
        parse_decentralized(cfg)


def test_initialize_refuses_before_building_anything() -> None:
    import ds_spngd

    with pytest.raises(DecentralizedConfigError, match=r"optimizer\.params\.bogus"):
        ds_spngd.initialize(model=build_model(), config=_cfg({"bogus": 1}))
    with pytest.raises(ValueError, match="optimizer object was passed as well"):
        model = build_model()
        ds_spngd.initialize(model=model, config=_cfg(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_defaults_and_case_insensitive_type() -> None:
    name, params = parse_decentralized(_cfg(type_="decentlam"))
    assert name == "decentlam" and params.topology == "ring" and params.momentum == 0.9
    assert parse_decentralized(_cfg(type_="DMSGD"))[0] == "dmsgd"
