"""Online minimum detection on a noisy loss curve by Gaussian-process smoothing (the test of AutoWU's warmup phase).

Kim et al., "Automated Learning Rate Scheduler for Large-batch Training", arXiv:2107.05855 (8th ICML AutoML workshop,
2021), section "Online minimum detection via Gaussian process", and the authors' reference implementation
(github.com/kakaobrain/autowu, ``AutoWU.maybe_switch`` / ``past_minimum_prob``): fit a GP to the recent training
losses, and call the minimum *attained in the past* when the smoothed loss now is, with high posterior probability,
above the smoothed loss at some earlier point::

    p = max_{i < k} P(f_i < f_k),    (f_1, ..., f_k) ~ GP posterior of the latent (noise-free) loss at the
                                     window's steps, k = the latest step

Each pairwise probability is ``Phi((m_k - m_i) / sqrt(C_ii + C_kk - 2 C_ik + jitter))`` with posterior mean ``m`` and
covariance ``C``; for i next to k it is the posterior confidence that the smoothed curve's slope is positive, for i
far back that the curve has come back up above its earlier level.

Model (as in the reference implementation, in scikit-learn terms): inputs are the steps scaled to [0, 1] over the
window; the losses are standardized (the zero prior mean on standardized losses is the reference's constant mean set
to the data mean); kernel ``ConstantKernel * RBF(length_scale, fixed) + WhiteKernel``: the length scale is fixed as a
fraction of the window (the reference fixes 0.2), signal variance and noise level are fitted by maximum marginal
likelihood (L-BFGS, no random restarts: the fit is a deterministic function of its inputs, so ranks with the same
losses decide the same). The reference subsamples at most 100 points for the hyperparameter fit and takes a majority
vote of 5 predictions on random subsamples; here one deterministic fit on the window's points is used instead.

Imports no DeepSpeed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.linalg import solve_triangular
from scipy.special import ndtr
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
from threadpoolctl import threadpool_limits

__all__ = ["MinimumTest", "past_minimum_test"]

JITTER = 1e-4  # added to the variance of f_k - f_i, in standardized loss units (the reference adds 1e-4)


@dataclass(frozen=True)
class MinimumTest:
    """Result of :func:`past_minimum_test`.

    Attributes:
        probability: ``max_{i<k} P(f_i < f_k)`` in [0, 1]: confidence that the smoothed loss was lower before.
        argmin: index (into the inputs) of the posterior mean's minimum.
        smoothed: posterior mean of the latent loss at each input step (loss units).
        noise_std: fitted observation noise standard deviation (loss units).
    """

    probability: float
    argmin: int
    smoothed: tuple[float, ...]
    noise_std: float


def past_minimum_test(steps: Sequence[int], losses: Sequence[float], length_scale: float = 0.2) -> MinimumTest:
    """Fit the GP to ``(steps, losses)`` and test whether the latest smoothed loss lies above an earlier one.

    Args:
        steps: optimizer step of each loss, increasing (at least 3 points).
        losses: finite training losses (loss units), one per step.
        length_scale: RBF length scale as a fraction of the window ``steps[-1] - steps[0]`` (> 0).

    Returns:
        The :class:`MinimumTest`.

    Raises:
        ValueError: fewer than 3 points, mismatched lengths, non-increasing steps, non-finite losses or a
            non-positive ``length_scale``.
    """
    x, y = _checked(steps, losses, length_scale)
    mean, std = float(y.mean()), float(y.std())
    scale = std if std > 0 else 1.0
    z = (y - mean) / scale
    kernel = (ConstantKernel(1.0, (1e-3, 1e3)) * RBF(length_scale, length_scale_bounds="fixed")
              + WhiteKernel(0.1, (1e-6, 1e1)))
    gp = GaussianProcessRegressor(kernel=kernel, normalize_y=False, n_restarts_optimizer=0, random_state=0)
    # one BLAS thread: the matrices are small (window x window) and training ranks already use every core
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # hyperparameters at a bound (a clean line) are fine
        gp.fit(x, z)
        signal = gp.kernel_.k1  # ConstantKernel * RBF: the latent curve without the white noise
        k_train = signal(x)
        m = k_train @ gp.alpha_  # posterior mean of the latent curve at the training inputs
        v = solve_triangular(gp.L_, k_train, lower=True)
        cov = k_train - v.T @ v
    last = len(m) - 1
    var = np.clip(cov.diagonal()[:last] + cov[last, last] - 2.0 * cov[:last, last], 0.0, None) + JITTER
    probs = ndtr((m[last] - m[:last]) / np.sqrt(var))
    noise = float(np.sqrt(gp.kernel_.k2.noise_level)) * scale
    return MinimumTest(probability=float(probs.max()), argmin=int(np.argmin(m)),
                       smoothed=tuple(float(v) * scale + mean for v in m), noise_std=noise)


def _checked(steps: Sequence[int], losses: Sequence[float], length_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Inputs scaled to [0, 1] (column vector) and losses as float64 arrays, after the checks of the caller."""
    if len(steps) != len(losses):
        raise ValueError(f"past_minimum_test: {len(steps)} steps but {len(losses)} losses")
    if len(steps) < 3:
        raise ValueError(f"past_minimum_test needs at least 3 points, got {len(steps)}")
    if not (length_scale > 0 and math.isfinite(length_scale)):
        raise ValueError(f"past_minimum_test: length_scale must be positive, got {length_scale}")
    s = np.asarray(steps, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if np.any(np.diff(s) <= 0):
        raise ValueError("past_minimum_test: steps must be strictly increasing")
    if not np.all(np.isfinite(y)):
        raise ValueError("past_minimum_test: losses must be finite")
    x = ((s - s[0]) / (s[-1] - s[0]))[:, None]
    return x, y
