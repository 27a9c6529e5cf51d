"""Host syncs per step are O(1), factors accumulate in fp32, and ``memory_usage()`` / ``memory_plan()`` add up.

Host syncs (``.item()``, ``.tolist()``, ``bool(t)``, ``float(t)``, ``int(t)``, ``.cpu()``, ``.numpy()``) stall a GPU
pipeline; SP-NGD may issue a fixed number per step (the step's agreement; on inversion steps the Cholesky status
check and the inversion agreement), never one per layer. They are counted with a TorchFunctionMode that attributes
each call to the first caller outside torch; only calls from ds_spngd's files count. The same training run on a
2-block and a 10-block model must issue the same number.

Memory: the arithmetic is checked by hand against the factor shapes of a tiny model, and ``memory_plan`` (computed
from shapes and owners before anything exists) against what each rank really holds in the multi-rank runs of
tests/integrations/test_replicas.py's worker.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ds_spngd import SPNGD

SYNCS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}


class SyncCounter(TorchFunctionMode):
    """Counts host-syncing tensor calls made from ds_spngd's own files (by file:line)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in SYNCS:
            frame = sys._getframe(1)
            while frame is not None and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back  # type: ignore[assignment]
            if frame is not None and "/ds_spngd/" in frame.f_code.co_filename:
                where = frame.f_code.co_filename.split("/ds_spngd/")[-1]
                self.calls[f"{where}:{frame.f_lineno}"] += 1
        return func(*args, **(kwargs or {}))


def _mlp(depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(6, 8), nn.LayerNorm(8)]
    for _ in range(depth - 2):
        layers += [nn.Linear(8, 8), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(8, 3))


def _count(depth: int, cfg: dict, steps: int = 6) -> tuple[int, Counter[str], int]:
    model = _mlp(depth)
    opt = SPNGD(model.parameters(), model=model, config=cfg)
    gen = torch.Generator().manual_seed(1)
    counter = SyncCounter()
    with counter:
        for _ in range(steps):
            x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return sum(counter.calls.values()), counter.calls, len(opt.blocks)


@pytest.mark.parametrize("method", ["inverse", "eigen"])
def test_host_syncs_per_step_do_not_grow_with_the_number_of_layers(method: str) -> None:
    cfg = {"lr": 0.1, "factor_update_steps": 1, "inv_update_steps": 2, "kl_clip": 0.01, "weight_rescale": True,
           "weight_decay": 1e-4, "inverse_method": method}
    small, small_where, small_blocks = _count(2, cfg)
    large, large_where, large_blocks = _count(10, cfg)
    assert large_blocks >= small_blocks + 8  # the guard: the models really differ in depth
    assert small == large, f"syncs grow with depth: {small_where} vs {large_where}"
    # per step: the agreement; on the 3 inversion steps of 6 also the Cholesky check and the inversion agreement
    assert large <= 6 + 2 * 3, large_where


def test_factors_accumulate_in_fp32_for_a_bf16_model() -> None:
    model = _mlp(3).to(torch.bfloat16)
    opt = SPNGD(model.parameters(), model=model, config={"lr": 0.1})
    x, y = torch.randn(16, 6, dtype=torch.bfloat16), torch.randint(0, 3, (16,))
    F.cross_entropy(model(x).float(), y).backward()
    accums = [f.accum for b in opt.blocks for f in b.factors]
    assert accums and all(a is not None and a.dtype == torch.float32 for a in accums)
    opt.step()
    for b in opt.blocks:
        assert all(f.value is not None and f.value.dtype == torch.float32 for f in b.factors)
        assert all(t.dtype == torch.float32 for t in b.preconditioner_tensors())
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())


# ---- memory ------------------------------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.ln(self.fc1(x))))


# factor sides (B, d): fc1 A (1, 5+1), fc1 G (1, 6), ln F (6 units, 2), fc2 A (1, 6+1), fc2 G (1, 3)
FACTORS = [(1, 6), (1, 6), (6, 2), (1, 7), (1, 3)]
FACTOR_BYTES = 4 * sum(b * d * d for b, d in FACTORS)  # 616
PACKED_BYTES = 4 * sum(b * d * (d + 1) // 2 for b, d in FACTORS)  # fp32 upper triangles: 376
PARAM_BYTES = 4 * (5 * 6 + 6 + 6 + 6 + 6 * 3 + 3)  # 276: the fp32 momentum buffers
EIGEN_EXTRA = 4 * (6 * 6 + 3 * 7)  # eigen keeps the d_G × d_A scale matrices of fc1 and fc2 too


@pytest.mark.parametrize("method", ["inverse", "eigen"])
def test_memory_usage_arithmetic_from_the_factor_shapes(method: str) -> None:
    torch.manual_seed(0)
    model = Tiny()
    opt = SPNGD(model.parameters(), model=model, config={"lr": 0.1, "inverse_method": method})
    assert FACTOR_BYTES == 616 and PACKED_BYTES == 376 and PARAM_BYTES == 276
    precond = FACTOR_BYTES + (EIGEN_EXTRA if method == "eigen" else 0)
    assert opt.memory_usage() == {"factors": 0, "accumulators": 0, "preconditioners": 0, "comm_buffers": 0,
                                  "momentum": 0, "total": 0}
    plan = opt.memory_plan()
    assert plan == {"factors": FACTOR_BYTES, "accumulators": FACTOR_BYTES, "preconditioners": precond,
                    "comm_buffers": PACKED_BYTES + FACTOR_BYTES, "momentum": PARAM_BYTES,
                    "total": 3 * FACTOR_BYTES + precond + PACKED_BYTES + PARAM_BYTES}
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    assert opt.memory_usage()["accumulators"] == FACTOR_BYTES  # between backward and step
    opt.step()
    held = opt.memory_usage()
    assert held == {"factors": FACTOR_BYTES, "accumulators": 0, "preconditioners": precond, "comm_buffers": 0,
                    "momentum": PARAM_BYTES, "total": FACTOR_BYTES + precond + PARAM_BYTES}
    for key in ("factors", "preconditioners", "momentum"):
        assert held[key] == plan[key]
