"""``factor_dtype``: the outer products behind the factors in bf16 (fp32 accumulation) or fp32.

References are independent: the factor E[x xᵀ] of the inputs a layer actually saw (captured by a forward hook) and
E[ĝ ĝᵀ] of its per-example output gradients (captured by a tensor hook, times the batch size for the mean loss),
both computed in fp64 from those same values.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ds_spngd import SPNGD
from ds_spngd.curvature.factor import SymmetricFactor

F64 = torch.float64


def rel(a: Tensor, b: Tensor) -> float:
    return float((a.to(F64) - b.to(F64)).norm() / b.to(F64).norm())


@pytest.mark.parametrize("blocks", [1, 3])
def test_cast_rules_and_products(blocks: int) -> None:
    torch.manual_seed(0)
    rows = torch.randn(blocks, 257, 24)
    ref = torch.einsum("bmi,bmj->bij", rows.to(F64), rows.to(F64))
    bf = rows.bfloat16()
    ref_bf = torch.einsum("bmi,bmj->bij", bf.to(F64), bf.to(F64))
    cases = {("auto", rows): (torch.float32, ref, 1e-6), ("auto", bf): (torch.bfloat16, ref_bf, 1e-2),
             ("bf16", rows): (torch.bfloat16, ref, 1e-2), ("fp32", bf): (torch.float32, ref_bf, 1e-6),
             ("auto", rows.half()): (torch.float32, None, 1e-3)}
    for (precision, r), (dtype, want, tol) in cases.items():
        f = SymmetricFactor("t", 24, blocks=blocks)
        f.precision = precision
        assert f.cast(r).dtype == dtype, (precision, r.dtype)
        f.add(r if blocks > 1 else r[0], 0.5, 257)
        assert f.accum is not None and f.accum.dtype == torch.float32
        target = 0.5 * (want if want is not None else ref)
        err = rel(f.accum, target)
        assert err < tol, (precision, r.dtype, err)
        if dtype == torch.bfloat16:  # a bf16 product really is rounded (not an fp32 product in disguise)
            assert err > 1e-6


def test_diagonal_side_in_bf16() -> None:
    torch.manual_seed(1)
    rows = torch.randn(300, 40).bfloat16()
    f = SymmetricFactor.for_side("d", 40, 8, "diagonal")
    f.add(rows, 1.0, 300)
    assert f.accum is not None
    want = rows.to(F64).square().sum(0)
    assert rel(f.accum.reshape(-1), want) < 1e-2


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 16), nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("factor_dtype", ["auto", "bf16", "fp32"])
def test_linear_factors_match_fp64_reference(model_dtype: torch.dtype, factor_dtype: str) -> None:
    torch.manual_seed(2)
    model = Tiny().to(model_dtype)
    n = 64
    x, y = torch.randn(n, 12).to(model_dtype), torch.randint(0, 5, (n,))
    seen: dict[str, Tensor] = {}

    def capture(module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        seen["x"] = inputs[0].detach()
        out.register_hook(lambda g: seen.__setitem__("g", g.detach()))

    model.fc2.register_forward_hook(capture)
    opt = SPNGD(model.parameters(), model=model, config={"lr": 1e-3, "momentum": 0.0, "factor_decay": 0.0,
                                                         "factor_dtype": factor_dtype})
    opt.zero_grad()
    F.cross_entropy(model(x).float(), y).backward()
    opt.step()
    blk = next(b for b in opt.blocks if b.name == "fc2")
    xs = torch.cat([seen["x"].to(F64), torch.ones(n, 1, dtype=F64)], dim=1)
    gs = seen["g"].to(F64) * n  # per-example gradients of the mean loss
    a_ref, g_ref = xs.T @ xs / n, gs.T @ gs / n
    low = factor_dtype == "bf16" or (factor_dtype == "auto" and model_dtype == torch.bfloat16)
    tol = 1e-2 if low else 1e-5
    assert blk.a.value is not None and blk.g.value is not None
    assert blk.a.value.dtype == torch.float32
    assert rel(blk.a.value[0], a_ref) < tol
    assert rel(blk.g.value[0], g_ref) < tol
