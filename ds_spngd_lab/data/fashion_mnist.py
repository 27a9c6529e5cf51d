"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747; MIT licence) from its original IDX files.

Zalando's 28×28 grey-scale images of 10 clothing classes, made as a harder drop-in replacement for MNIST (same
image size, class count and file format). 60,000 training and 10,000 test images in four IDX files:
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``,
each plain or with ``.gz``.

Where they are looked for: the folder in the environment variable ``FASHION_MNIST_DIR`` if it is set, else the
Debian/Ubuntu package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``, installed by
``launch/setup.sh`` where ``apt-get`` is usable).

Splits follow :mod:`ds_spngd_lab.data.mnist` (the classic ``mnist.pkl.gz`` layout): ``train`` is the first 50,000
images of the training file, ``valid`` its last 10,000, ``test`` the 10,000 test images; pixels are scaled to
[0, 1] and normalised with the mean and std of the 50,000 ``train`` images (computed at load time).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ds_spngd_lab.data.idx import read_idx
from ds_spngd_lab.data.mnist import IMAGE_SHAPE, NUM_CLASSES, MnistSplits

__all__ = ["CLASS_NAMES", "DEBIAN_DIR", "ENV_VAR", "FILES", "find_fashion_mnist_dir", "load_fashion_mnist",
           "read_fashion_mnist"]  # fmt: skip

ENV_VAR = "FASHION_MNIST_DIR"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
#: logical name -> file stem (a file is found as ``<stem>.gz`` or ``<stem>``)
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")  # fmt: skip
VALID_SIZE = 10_000
INSTALL_HINT = (
    f"install the Debian package with `apt-get install {DEBIAN_PACKAGE}` (as root; it puts the files in "
    f"{DEBIAN_DIR}), or set {ENV_VAR} to a folder holding the four IDX files "
    f"({', '.join(stem + '[.gz]' for stem in FILES.values())})"
)


def _file_in(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def find_fashion_mnist_dir() -> Path:
    """The folder holding the four Fashion-MNIST IDX files: ``$FASHION_MNIST_DIR`` if set, else :data:`DEBIAN_DIR`.

    Raises:
        FileNotFoundError: a file is missing there; the message names the folder, the missing files and how to
            install the data (``apt-get install dataset-fashion-mnist``, or the environment variable).
    """
    override = os.environ.get(ENV_VAR)
    root = Path(override) if override else DEBIAN_DIR
    missing = [stem for stem in FILES.values() if _file_in(root, stem) is None]
    if missing:
        where = f"{ENV_VAR}={override}" if override else f"{root} (the Debian package's folder; {ENV_VAR} is unset)"
        raise FileNotFoundError(
            f"Fashion-MNIST not found: {where} lacks {', '.join(missing)}. To get it, {INSTALL_HINT}."
        )
    return root


def read_fashion_mnist(root: str | os.PathLike[str] | None = None) -> dict[str, np.ndarray]:
    """The four raw arrays, checked.

    Args:
        root: folder of the IDX files; ``None`` uses :func:`find_fashion_mnist_dir`.

    Returns:
        ``{"train_images": uint8 (N, 28, 28), "train_labels": uint8 (N,), "test_images": uint8 (M, 28, 28),
        "test_labels": uint8 (M,)}`` (N = 60,000 and M = 10,000 for the real data set).

    Raises:
        FileNotFoundError: a file is missing (message says how to install the data).
        ValueError: naming the file: not IDX / truncated (:func:`ds_spngd_lab.data.idx.read_idx`), images not
            ``uint8 (N, 28, 28)``, labels not ``uint8 (N,)`` in [0, 9], or image and label counts that differ.
    """
    folder = find_fashion_mnist_dir() if root is None else Path(root)
    out: dict[str, np.ndarray] = {}
    paths: dict[str, Path] = {}
    for key, stem in FILES.items():
        path = _file_in(folder, stem)
        if path is None:
            raise FileNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found in {folder}. To get it, {INSTALL_HINT}.")
        paths[key] = path
        out[key] = read_idx(path)
    for split in ("train", "test"):
        images, labels = out[f"{split}_images"], out[f"{split}_labels"]
        ipath, lpath = paths[f"{split}_images"], paths[f"{split}_labels"]
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE[1:] or len(images) == 0:
            raise ValueError(f"{ipath}: expected uint8 images of shape (N>0, 28, 28), got {images.dtype} "
                             f"{images.shape}")  # fmt: skip
        if labels.dtype != np.uint8 or labels.ndim != 1:
            raise ValueError(f"{lpath}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}")
        if len(labels) != len(images):
            raise ValueError(
                f"{lpath} has {len(labels)} labels but {ipath} has {len(images)} images: the counts must match"
            )
        if int(labels.max()) >= NUM_CLASSES:
            raise ValueError(f"{lpath}: labels must lie in [0, {NUM_CLASSES - 1}], got max {int(labels.max())}")
    return out


def load_fashion_mnist(root: str | os.PathLike[str] | None = None, valid_size: int = VALID_SIZE) -> MnistSplits:
    """Fashion-MNIST as normalised tensors in the structure of :func:`ds_spngd_lab.data.mnist.load_mnist`.

    Args:
        root: folder of the IDX files; ``None`` uses :func:`find_fashion_mnist_dir`.
        valid_size: images held out from the end of the training file as ``valid`` (10,000, as MNIST's pickle).

    Returns:
        :class:`MnistSplits`: ``train_x`` float32 ``(N - valid_size, 1, 28, 28)``, ``valid_x`` ``(valid_size, 1, 28,
        28)``, ``test_x`` ``(M, 1, 28, 28)``, normalised with ``mean`` / ``std`` of the ``train`` pixels in [0, 1];
        labels int64 in [0, 9].

    Raises:
        FileNotFoundError: a file is missing (message says how to install the data).
        ValueError: malformed files (see :func:`read_fashion_mnist`), or ``valid_size`` outside [0, N).
    """
    raw = read_fashion_mnist(root)
    images, labels = raw["train_images"], raw["train_labels"]
    if not 0 <= valid_size < len(images):
        raise ValueError(f"valid_size must lie in [0, {len(images)}), got {valid_size}")
    cut = len(images) - valid_size
    train = images[:cut].astype(np.float32) / 255.0
    mean = float(train.mean(dtype=np.float64))
    std = float(train.std(dtype=np.float64))
    if std <= 0.0:
        raise ValueError("Fashion-MNIST train images are constant (std 0); cannot normalise")

    def tensor(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(-1, *IMAGE_SHAPE)
        return (t - mean) / std

    def targets(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(y.astype(np.int64))

    return MnistSplits(
        train_x=tensor(train),
        train_y=targets(labels[:cut]),
        valid_x=tensor(images[cut:].astype(np.float32) / 255.0),
        valid_y=targets(labels[cut:]),
        test_x=tensor(raw["test_images"].astype(np.float32) / 255.0),
        test_y=targets(raw["test_labels"]),
        mean=mean,
        std=std,
    )
