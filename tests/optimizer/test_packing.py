"""Upper-triangle packing of symmetric factor batches and the traffic accounting built on it."""

from __future__ import annotations

import pytest
import torch

from ds_spngd.comm.factor_reduction import factor_traffic_bytes
from ds_spngd.comm.packing import pack_symmetric, triu_numel, unpack_symmetric
from ds_spngd.curvature.factor import SymmetricFactor

SHAPES = [(1, 1), (1, 7), (5, 2), (3, 64)]  # (B, d)


def _sym_batch(b: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, d, generator=gen, dtype=torch.float64)
    return (x + x.transpose(1, 2)).float()


def _reference_pack(m: torch.Tensor) -> list[float]:
    """Row-major upper triangle by plain loops."""
    out = []
    for blk in m:
        d = blk.shape[0]
        for i in range(d):
            for j in range(i, d):
                out.append(float(blk[i, j]))
    return out


@pytest.mark.parametrize("d", [1, 2, 3, 7, 64])
def test_triu_numel(d: int) -> None:
    assert triu_numel(d) == sum(1 for i in range(d) for _ in range(i, d))


@pytest.mark.parametrize(("b", "d"), SHAPES)
def test_round_trip_fp32_exact(b: int, d: int) -> None:
    m = _sym_batch(b, d, seed=b * 100 + d)
    flat = pack_symmetric([m])
    assert flat.dtype == torch.float32 and flat.dim() == 1
    assert flat.numel() == b * d * (d + 1) // 2
    assert flat.tolist() == _reference_pack(m)
    (back,) = unpack_symmetric(flat, [(b, d)])
    assert back.shape == (b, d, d) and back.dtype == torch.float32
    assert torch.equal(back, m)


def test_round_trip_several_batches_in_one_buffer() -> None:
    mats = [_sym_batch(b, d, seed=i) for i, (b, d) in enumerate(SHAPES)]
    flat = pack_symmetric(mats)
    assert flat.numel() == sum(b * d * (d + 1) // 2 for b, d in SHAPES)
    assert flat.tolist() == [v for m in mats for v in _reference_pack(m)]
    back = unpack_symmetric(flat, SHAPES)
    assert len(back) == len(mats)
    for got, want in zip(back, mats, strict=True):
        assert torch.equal(got, want)


def test_two_dim_matrix_is_one_block() -> None:
    m = _sym_batch(1, 5, seed=3)[0]
    flat = pack_symmetric([m])
    assert flat.numel() == 15
    (back,) = unpack_symmetric(flat, [(1, 5)])
    assert torch.equal(back[0], m)


def test_only_the_upper_triangle_travels() -> None:
    """Unpacking mirrors the upper triangle: the lower triangle of a non-symmetric input is not used."""
    m = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4)
    (back,) = unpack_symmetric(pack_symmetric([m]), [(1, 4)])
    upper = torch.triu(m[0])
    assert torch.equal(back[0], upper + upper.t() - torch.diag(torch.diagonal(m[0])))


@pytest.mark.parametrize(("dtype", "rel"), [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
@pytest.mark.parametrize(("b", "d"), SHAPES)
def test_round_trip_half_precision(b: int, d: int, dtype: torch.dtype, rel: float) -> None:
    m = _sym_batch(b, d, seed=7 * b + d)
    flat = pack_symmetric([m], dtype=dtype)
    assert flat.dtype == dtype and flat.numel() == b * triu_numel(d)
    (back,) = unpack_symmetric(flat, [(b, d)], dtype=torch.float32)
    assert torch.equal(back, back.transpose(1, 2))
    assert torch.equal(back, m.to(dtype).float())  # exactly the dtype's rounding, nothing more
    assert torch.all((back - m).abs() <= rel * m.abs() + 1e-30)


def test_unpack_dtype_argument() -> None:
    m = _sym_batch(2, 3, seed=0)
    (back,) = unpack_symmetric(pack_symmetric([m]), [(2, 3)], dtype=torch.float64)
    assert back.dtype == torch.float64
    assert torch.equal(back, m.double())


@pytest.mark.parametrize("delta", [-1, 1, 10])
def test_wrong_length_raises(delta: int) -> None:
    m = _sym_batch(3, 4, seed=1)
    flat = pack_symmetric([m])
    wrong = torch.zeros(flat.numel() + delta)
    with pytest.raises(ValueError, match=str(flat.numel())):
        unpack_symmetric(wrong, [(3, 4)])


def test_wrong_shapes_raise() -> None:
    flat = pack_symmetric([_sym_batch(2, 3, seed=1)])  # 12 values
    with pytest.raises(ValueError):
        unpack_symmetric(flat, [(1, 3)])
    with pytest.raises(ValueError):
        unpack_symmetric(flat, [(2, 3), (1, 1)])


@pytest.mark.parametrize("d", [1, 2, 7, 64, 577])
def test_traffic_ratio_single_factor(d: int) -> None:
    f = SymmetricFactor("x.A", d)
    packed, dense = factor_traffic_bytes([f])
    assert packed == 4 * d * (d + 1) // 2
    assert dense == 4 * d * d
    assert packed / dense == pytest.approx((d + 1) / (2 * d), rel=1e-12)
    packed_bf16, dense_bf16 = factor_traffic_bytes([f], dtype=torch.bfloat16)
    assert dense_bf16 == dense
    assert packed_bf16 / dense_bf16 == pytest.approx((d + 1) / (4 * d), rel=1e-12)


def test_traffic_several_factors() -> None:
    factors = [SymmetricFactor("a", 10), SymmetricFactor("g", 3), SymmetricFactor("bn", 2, blocks=16)]
    packed, dense = factor_traffic_bytes(factors)
    assert packed == 4 * (55 + 6 + 16 * 3)
    assert dense == 4 * (100 + 9 + 16 * 4)
    assert [f.packed_numel for f in factors] == [55, 6, 48]
