"""Cost-model assignment of Fisher-block inversions to ranks (greedy LPT), checked against lower bounds."""

from __future__ import annotations

import itertools

import pytest

from ds_spngd import SPNGD
from ds_spngd.comm.assignment import assign_owners, block_cost
from ds_spngd_lab.models import build_model


def resnet50_costs(kind: str = "compute") -> list[float]:
    model = build_model("resnet50", 1000, 3)
    opt = SPNGD(model.parameters(), model=model, max_factor_dim=8192)  # every factor dense, as in the paper
    opt.remove_hooks()
    return [block_cost([(f.blocks, f.dim) for f in b.factors], kind) for b in opt.blocks]  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def costs() -> list[float]:
    return resnet50_costs()


def test_block_cost() -> None:
    assert block_cost([(1, 10), (1, 4)]) == 10**3 + 4**3
    assert block_cost([(64, 2)], "memory") == 64 * 4
    with pytest.raises(ValueError, match="unknown cost kind"):
        block_cost([(1, 3)], "flops")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        block_cost([(0, 3)])


@pytest.mark.parametrize("world", [1, 2, 3, 8, 64])
def test_resnet50_assignment_is_lpt_balanced(costs: list[float], world: int) -> None:
    a = assign_owners(costs, world)
    assert len(a.owners) == len(costs) and set(a.owners) <= set(range(world))
    assert sum(a.loads) == pytest.approx(sum(costs))
    for r in range(world):  # loads are the sums of the owned costs
        assert a.loads[r] == pytest.approx(sum(costs[i] for i in a.blocks_of(r)))
    # any schedule needs at least max(total / m, largest job); LPT is within 4/3 of the optimum (Graham 1969)
    lower = max(sum(costs) / world, max(costs))
    assert max(a.loads) <= 4 / 3 * lower + 1e-6
    if sum(costs) / world >= max(costs):  # no single block exceeds the mean load: LPT balances (1, 2, 3 ranks)
        assert a.imbalance < 1.05
    else:  # the largest blocks (3x3 convs with 512 inputs: A is 4608 x 4608) set the makespan; LPT meets it
        assert max(a.loads) == pytest.approx(max(costs))
    print(f"world {world}: max/mean load {a.imbalance:.3f}, max/lower bound {max(a.loads) / lower:.3f}")


def test_small_instances_match_brute_force_within_lpt_bound() -> None:
    costs = [7.0, 5.0, 4.0, 4.0, 3.0, 3.0, 2.0]
    for world in (2, 3):
        best = min(max(sum(c for c, r in zip(costs, ow, strict=True) if r == k) for k in range(world))
                   for ow in itertools.product(range(world), repeat=len(costs)))
        got = max(assign_owners(costs, world).loads)
        assert best <= got <= (4 / 3 - 1 / (3 * world)) * best + 1e-9


def test_more_ranks_than_blocks_and_determinism() -> None:
    a = assign_owners([3.0, 1.0, 2.0], 5)
    assert a.owners == (0, 2, 1)  # largest first to the least-loaded (lowest) rank
    assert a.loads == (3.0, 2.0, 1.0, 0.0, 0.0)
    assert assign_owners([1.0, 1.0, 1.0], 2) == assign_owners([1.0, 1.0, 1.0], 2)
    with pytest.raises(ValueError, match="world_size"):
        assign_owners([1.0], 0)
    with pytest.raises(ValueError, match="non-negative"):
        assign_owners([1.0, float("nan")], 2)
