"""Damped inverses, eigendecompositions and the π of factored Tikhonov damping, against fp64 references."""

from __future__ import annotations

import math

import pytest
import torch

from ds_spngd import linalg
from ds_spngd.linalg import damped_inverse, damped_inverse_small, pi_correction, sym_eigh


def _psd(d: int, rank: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """fp64 PSD d×d of the given rank (X Xᵀ / rank)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(d, rank, generator=gen, dtype=torch.float64) * scale
    return x @ x.t() / max(rank, 1)


def _ref_inverse(m: torch.Tensor, damping: float) -> torch.Tensor:
    m64 = m.double()
    return torch.linalg.inv(m64 + damping * torch.eye(m64.shape[-1], dtype=torch.float64))


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


# ---- damped_inverse --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("d", "rank", "damping"), [(1, 1, 1e-3), (5, 5, 1e-3), (16, 16, 1e-2), (16, 3, 1e-2),
                                                    (40, 10, 0.1), (33, 0, 0.5), (64, 64, 1e-1)])
def test_damped_inverse_matches_fp64(d: int, rank: int, damping: float) -> None:
    m = _psd(d, rank, seed=d + rank)
    got = damped_inverse(m.float(), damping)
    assert got.dtype == torch.float32 and got.shape == (d, d)
    assert torch.equal(got, got.t())
    ref = _ref_inverse(m, damping)
    cond = float(torch.linalg.cond(m + damping * torch.eye(d, dtype=torch.float64)))
    assert _rel_err(got, ref) < 1e-6 * cond + 1e-6, (_rel_err(got, ref), cond)


def test_damped_inverse_upcasts_half_input() -> None:
    m = _psd(8, 8, seed=1).to(torch.bfloat16)
    got = damped_inverse(m, 0.1)
    assert got.dtype == torch.float32
    assert _rel_err(got, _ref_inverse(m.double(), 0.1)) < 1e-5


def test_damped_inverse_batch() -> None:
    ms = torch.stack([_psd(6, r, seed=r) for r in (1, 3, 6)])
    got = damped_inverse(ms.float(), 0.05)
    for i in range(3):
        assert _rel_err(got[i], _ref_inverse(ms[i], 0.05)) < 1e-5


def test_damped_inverse_eigen_fallback_when_cholesky_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reported Cholesky failure routes to the eigendecomposition, which gives the same inverse for a PSD factor."""
    calls = {"chol": 0, "eigh": 0}
    real_chol, real_eigh = torch.linalg.cholesky_ex, torch.linalg.eigh

    def failing_cholesky_ex(a: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls["chol"] += 1
        chol, info = real_chol(a, *args, **kwargs)
        return torch.full_like(chol, float("nan")), torch.ones_like(info)

    def counting_eigh(a: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls["eigh"] += 1
        return real_eigh(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing_cholesky_ex)
    monkeypatch.setattr(torch.linalg, "eigh", counting_eigh)
    for rank in (12, 4):
        m = _psd(12, rank, seed=rank)
        got = damped_inverse(m.float(), 0.03)
        assert torch.isfinite(got).all()
        assert _rel_err(got, _ref_inverse(m, 0.03)) < 1e-5
        assert torch.allclose(got, got.t(), atol=1e-5 * float(got.abs().max()))
    assert calls["chol"] == 2 and calls["eigh"] >= 2


def test_damped_inverse_cholesky_path_does_not_need_eigh(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_eigh(*args: object, **kwargs: object) -> None:
        raise AssertionError("eigh called although the Cholesky succeeded")

    monkeypatch.setattr(torch.linalg, "eigh", no_eigh)
    m = _psd(10, 10, seed=2)
    assert _rel_err(damped_inverse(m.float(), 0.1), _ref_inverse(m, 0.1)) < 1e-6


def test_damped_inverse_indefinite_input_clamps_eigenvalues() -> None:
    """A factor with a negative eigenvalue (beyond what small damping fixes) makes the Cholesky fail for real; the
    documented fallback inverts Q diag(max(λ, 0) + δ) Qᵀ (fp32: relative error ~ cond · eps, cond = 3/δ)."""
    gen = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    lam = torch.tensor([3.0, 1.0, 0.5, 0.1, 0.0, -0.2], dtype=torch.float64)
    m = q @ torch.diag(lam) @ q.t()
    damping = 1e-2
    info = torch.linalg.cholesky_ex(m.float() + damping * torch.eye(6))[1]
    assert int(info) != 0  # the precondition of this test: the fast path fails
    got = damped_inverse(m.float(), damping)
    ref = q @ torch.diag(1.0 / (lam.clamp_min(0.0) + damping)) @ q.t()
    assert torch.isfinite(got).all()
    assert _rel_err(got, ref) < 1e-4
    assert (torch.linalg.eigvalsh(got.double()) > 0).all()  # positive definite, unlike inv(m + δI)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_damped_inverse_non_finite_raises(bad: float) -> None:
    m = _psd(4, 4, seed=0).float()
    m[1, 2] = bad
    with pytest.raises(FloatingPointError):
        damped_inverse(m, 0.1)


# ---- sym_eigh --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("d", "rank"), [(1, 1), (7, 7), (20, 5), (64, 64)])
def test_sym_eigh_reconstructs(d: int, rank: int) -> None:
    m = _psd(d, rank, seed=3 * d + rank)
    evals, evecs = sym_eigh(m.float())
    assert evals.dtype == torch.float32 and evecs.dtype == torch.float32
    assert (evals >= 0).all()
    recon = (evecs.double() * evals.double()) @ evecs.double().t()
    assert float((recon - m).norm() / m.norm()) < 1e-5
    assert torch.allclose(evecs.double().t() @ evecs.double(), torch.eye(d, dtype=torch.float64), atol=1e-5)
    ref = torch.linalg.eigvalsh(m).clamp_min(0.0)
    assert torch.allclose(evals.double(), ref, atol=1e-5 * float(ref.max()))


def test_sym_eigh_batch_and_symmetrizes() -> None:
    m = torch.stack([_psd(5, 5, seed=i) for i in range(3)])
    skew = torch.randn(3, 5, 5, dtype=torch.float64) * 1e-3
    skew = skew - skew.transpose(1, 2)
    evals, evecs = sym_eigh((m + skew).float())  # only the symmetric part counts
    recon = evecs.double() @ torch.diag_embed(evals.double()) @ evecs.double().transpose(1, 2)
    assert float((recon - m).norm() / m.norm()) < 1e-5


def test_sym_eigh_clamps_negative_round_off() -> None:
    m = torch.diag(torch.tensor([2.0, 1.0, -1e-7]))
    evals, _ = sym_eigh(m)
    assert float(evals.min()) == 0.0 and float(evals.max()) == pytest.approx(2.0)


def test_sym_eigh_fp64_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    real_eigh = torch.linalg.eigh

    def fp32_fails(a: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return real_eigh(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", fp32_fails)
    m = _psd(6, 6, seed=9)
    evals, evecs = linalg.sym_eigh(m.float())
    assert evals.dtype == torch.float32
    recon = (evecs.double() * evals.double()) @ evecs.double().t()
    assert float((recon - m).norm() / m.norm()) < 1e-5


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sym_eigh_non_finite_raises(bad: float) -> None:
    m = torch.eye(3)
    m[0, 0] = bad
    with pytest.raises(FloatingPointError):
        sym_eigh(m)


# ---- pi_correction ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("da", "dg", "sa", "sg"), [(5, 3, 1.0, 1.0), (10, 4, 10.0, 0.1), (1, 7, 0.01, 3.0)])
def test_pi_correction_formula(da: int, dg: int, sa: float, sg: float) -> None:
    a = _psd(da, da, seed=da, scale=sa)
    g = _psd(dg, dg, seed=100 + dg, scale=sg)
    want = math.sqrt((float(torch.trace(a)) / da) / (float(torch.trace(g)) / dg))
    assert pi_correction(a.float(), g.float()) == pytest.approx(want, rel=1e-5)


def test_pi_correction_known_value() -> None:
    a = torch.diag(torch.tensor([4.0, 8.0]))  # tr/d = 6
    g = torch.diag(torch.tensor([1.0, 2.0, 3.0, 0.0, 1.5, 4.5]))  # tr/d = 2
    assert pi_correction(a, g) == pytest.approx(math.sqrt(3.0))
    assert pi_correction(g, a) == pytest.approx(math.sqrt(1.0 / 3.0))


def test_pi_correction_degenerate_factor() -> None:
    a = _psd(4, 4, seed=1).float()
    zero = torch.zeros(3, 3)
    assert pi_correction(a, zero) == 1.0
    assert pi_correction(zero, a) == 1.0
    assert pi_correction(zero, zero) == 1.0
    nan = torch.full((3, 3), float("nan"))
    assert pi_correction(a, nan) == 1.0
    inf = torch.diag(torch.tensor([float("inf"), 1.0, 1.0]))
    assert pi_correction(inf, a) == 1.0


# ---- damped_inverse_small --------------------------------------------------------------------------------------
def _psd_blocks(c: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(c, k, 3, generator=gen, dtype=torch.float64)
    blocks = x @ x.transpose(1, 2)
    blocks[0] = 0.0  # a unit that saw no gradient
    if k == 2:  # and a rank-one block
        v = torch.tensor([2.0, -1.0], dtype=torch.float64)
        blocks[1] = torch.outer(v, v)
    return blocks


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_damped_inverse_small_matches_inv(k: int, damping: float) -> None:
    blocks = _psd_blocks(9, k, seed=k)
    got = damped_inverse_small(blocks.float(), damping)
    assert got.shape == (9, k, k) and got.dtype == torch.float32
    for c in range(9):
        ref = torch.linalg.inv(blocks[c] + damping * torch.eye(k, dtype=torch.float64))
        assert torch.allclose(got[c].double(), ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max())), c


def test_damped_inverse_small_symmetrizes_off_diagonal() -> None:
    blocks = torch.tensor([[[2.0, 0.4], [0.6, 1.0]]])  # fp round-off asymmetry: the mean 0.5 is used
    got = damped_inverse_small(blocks, 0.1)
    ref = torch.linalg.inv(torch.tensor([[2.1, 0.5], [0.5, 1.1]], dtype=torch.float64))
    assert torch.allclose(got[0].double(), ref, rtol=1e-6)


def test_damped_inverse_small_rejects_3x3() -> None:
    with pytest.raises(ValueError, match="3x3"):
        damped_inverse_small(torch.eye(3).expand(4, 3, 3), 0.1)


def test_finish_inverses_isolates_a_failed_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two jobs whose Cholesky fails; the eigendecomposition of the second one does not converge either: only that
    job carries the error (so the optimizer names only its layer), the first is finished correctly."""
    from ds_spngd.linalg import InverseJob, finish_inverses

    good, bad = _psd(5, 5, seed=1).float(), _psd(4, 4, seed=2).float()
    real_chol, real_eigh = torch.linalg.cholesky_ex, torch.linalg.eigh

    def failing_cholesky_ex(a: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        chol, info = real_chol(a, *args, **kwargs)
        return chol, torch.ones_like(info)

    def eigh(a: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        if a.shape[-1] == 4:
            raise torch.linalg.LinAlgError("injected: did not converge")
        return real_eigh(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing_cholesky_ex)
    jobs = [InverseJob.start(good, 0.1), InverseJob.start(bad, 0.1)]
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    finish_inverses(jobs)
    assert jobs[0].error is None and jobs[1].error is not None
    assert _rel_err(jobs[0].inverse, _ref_inverse(good.double(), 0.1)) < 1e-5
    with pytest.raises(torch.linalg.LinAlgError):
        damped_inverse(bad, 0.1)
