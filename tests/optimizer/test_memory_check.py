"""The start-up memory check (ds_spngd.memory.check_memory): the planned bytes against a given free amount."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ds_spngd import SPNGD
from ds_spngd.memory import block_bytes, check_memory, memory_plan


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(300, 40), nn.Tanh(), nn.Linear(40, 7))


def test_check_memory_names_layer_bytes_and_keys() -> None:
    m = _model()
    opt = SPNGD(m.parameters(), model=m, memory_check=False)
    need = memory_plan(opt)["total"]
    assert [n for n, _ in block_bytes(opt)][0] == "0"  # 301² dominates
    check_memory(opt, free=int(need / 0.9) + 1)  # fits: nothing raised
    with pytest.raises(MemoryError) as err:
        check_memory(opt, free=need // 2)
    msg = str(err.value)
    assert f"{need / 2**30:.2f} GiB on rank 0" in msg and "Largest layers" in msg and "0 " in msg
    for key in ("max_factor_dim", "large_dim_method", "mem_opt", "skip_modules", "memory_check=false"):
        assert key in msg


def test_blocking_shrinks_the_plan_and_meta_models_are_not_checked() -> None:
    m = _model()
    dense = memory_plan(SPNGD(m.parameters(), model=m))["factors"]
    blocked = memory_plan(SPNGD(m.parameters(), model=m, max_factor_dim=100))["factors"]
    diag = memory_plan(SPNGD(m.parameters(), model=m, max_factor_dim=100, large_dim_method="diagonal"))["factors"]
    assert dense == 4 * (301**2 + 40**2 + 41**2 + 7**2)
    assert blocked == 4 * (4 * 76**2 + 40**2 + 41**2 + 7**2)  # 301 → 4 blocks of 76 (3 zero-padded coordinates)
    assert diag == 4 * (301 + 40**2 + 41**2 + 7**2)
    with torch.device("meta"):
        big = nn.Linear(60000, 60000)
    SPNGD(big.parameters(), model=big)  # 60001² fp32 factors planned, but nothing to compare with on meta
