"""A user's image folder (``root/<class>/*.jpg|png``) for ``--data-path``: discovery, splitting and a Pillow loader.

Layouts accepted:

* ``root/train/<class>/*`` and ``root/val/<class>/*`` (val classes must be a subset of train classes), or
* ``root/<class>/*``, split per class deterministically: a ``seed``-fixed shuffle of the sorted files puts
  ``round(val_fraction * count)`` of each class in validation (at least one image stays in training).

Class indices follow the sorted class-folder names. :func:`load_image_folder` returns batch sources with the same
interface as :class:`ds_spngd_lab.data.sampler.TensorBatches` (``epoch``, ``eval_batches``, ``steps_per_epoch``), using
NVIDIA DALI (:mod:`ds_spngd_lab.data.image_dali`) when it is importable and this Pillow implementation otherwise.
Images are RGB float32 ``(N, 3, S, S)`` normalised with the ImageNet mean/std; labels are int64 ``(N,)``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from ds_spngd_lab.data.image_constants import MEAN, RESIZE_RATIO, STD
from ds_spngd_lab.data.sampler import BatchPlan, micro_batch_indices, shard_range, steps_per_epoch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class BatchSource(Protocol):
    """What the training script needs from a data source (see :class:`ds_spngd_lab.data.sampler.TensorBatches`)."""

    @property
    def steps_per_epoch(self) -> int: ...

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass(frozen=True)
class FolderSplits:
    """Discovered files: ``classes[i]`` is the folder name of label ``i``; file lists are sorted and absolute."""

    classes: tuple[str, ...]
    train_files: tuple[str, ...]
    train_labels: tuple[int, ...]
    val_files: tuple[str, ...]
    val_labels: tuple[int, ...]


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _scan(root: Path, classes: list[str] | None = None) -> tuple[list[str], list[str], list[int]]:
    """Files and labels under ``root/<class>/``; with ``classes`` given, label by that list.

    Raises:
        FileNotFoundError: no class folders, a class folder without images, or a class unknown to ``classes``.
    """
    dirs = _class_dirs(root)
    if not dirs:
        raise FileNotFoundError(f"no class folders in {root}: expected {root}/<class>/*.jpg|png")
    names = [d.name for d in dirs] if classes is None else classes
    files: list[str] = []
    labels: list[int] = []
    for d in dirs:
        if d.name not in names:
            raise FileNotFoundError(f"class folder {d} is not among the training classes {names}")
        imgs = _images(d)
        if not imgs:
            raise FileNotFoundError(f"class folder {d} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        files.extend(str(p.resolve()) for p in imgs)
        labels.extend([names.index(d.name)] * len(imgs))
    return names, files, labels


def discover(root: Path | str, val_fraction: float = 0.1, seed: int = 0) -> FolderSplits:
    """Find classes and files under ``root`` (see the module docstring for the layouts).

    Raises:
        FileNotFoundError: ``root`` missing / not a folder, no class folders, a class without images, or ``val``
            classes absent from ``train``.
        ValueError: ``val_fraction`` outside ``[0, 1)`` for a single-folder layout.
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"image folder {base} does not exist or is not a folder")
    if (base / "train").is_dir() and (base / "val").is_dir():
        classes, tf, tl = _scan(base / "train")
        _, vf, vl = _scan(base / "val", classes)
        return FolderSplits(tuple(classes), tuple(tf), tuple(tl), tuple(vf), tuple(vl))
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    classes, files, labels = _scan(base)
    gen = torch.Generator().manual_seed(seed)
    train: list[tuple[str, int]] = []
    val: list[tuple[str, int]] = []
    for label in range(len(classes)):
        members = [f for f, lab in zip(files, labels, strict=True) if lab == label]
        order = torch.randperm(len(members), generator=gen).tolist()
        n_val = min(int(round(val_fraction * len(members))), len(members) - 1)
        val += [(members[i], label) for i in sorted(order[:n_val])]
        train += [(members[i], label) for i in sorted(order[n_val:])]
    return FolderSplits(
        tuple(classes),
        tuple(f for f, _ in train),
        tuple(lab for _, lab in train),
        tuple(f for f, _ in val),
        tuple(lab for _, lab in val),
    )


def load_pil(path: str, size: int, crop: tuple[float, float] | None, flip: bool) -> torch.Tensor:
    """Decode one image to float32 ``(3, size, size)``: shorter side to ``size * 256/224``, crop, flip, normalise.

    ``crop`` is the relative ``(x, y)`` position of the crop in ``[0, 1]`` (``None`` = centre).

    Raises:
        ValueError: naming the file if Pillow cannot read or decode it.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc
    w, h = img.size
    short = max(size, int(round(size * RESIZE_RATIO)))
    scale = short / min(w, h)
    nw, nh = max(size, int(round(w * scale))), max(size, int(round(h * scale)))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    px, py = (0.5, 0.5) if crop is None else crop
    left, top = int(round(px * (nw - size))), int(round(py * (nh - size)))
    img = img.crop((left, top, left + size, top + size))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (arr - mean) / std


class PilImageBatches:
    """Pillow-decoded batches over a file list, using the shared sampler layout of :mod:`ds_spngd_lab.data.sampler`.

    Training samples get a random crop position and horizontal flip drawn per sample from ``(seed, epoch)``, so a
    step's augmented global batch does not depend on the world size either;
    evaluation uses centre crops of this rank's contiguous shard.
    """

    def __init__(self, files: tuple[str, ...], labels: tuple[int, ...], plan: BatchPlan, image_size: int) -> None:
        if len(files) != len(labels) or not files:
            raise ValueError(f"need equally many (>0) files and labels, got {len(files)} and {len(labels)}")
        self.files = files
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.plan = plan
        self.image_size = image_size

    @property
    def steps_per_epoch(self) -> int:
        """``len(files) // plan.global_batch`` (ValueError if 0)."""
        return steps_per_epoch(len(self.files), self.plan.global_batch)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``steps_per_epoch * gas`` augmented micro-batches ``(x (b, 3, S, S), y (b,))`` for this rank."""
        n = len(self.files)
        gen = torch.Generator().manual_seed(int(self.plan.seed) * 1_000_003 + int(epoch) + 7)
        aug = torch.rand(n, 3, generator=gen)  # per-sample (crop x, crop y, flip) of this epoch, rank-independent
        for idx in micro_batch_indices(n, self.plan, epoch):
            x = torch.stack([self._augmented(j, aug[j].tolist()) for j in idx.tolist()])
            yield x, self.labels[idx]

    def _augmented(self, j: int, aug: list[float]) -> torch.Tensor:
        return load_pil(self.files[j], self.image_size, (aug[0], aug[1]), aug[2] < 0.5)

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's evaluation shard (centre crops) ``batch_size`` images at a time."""
        start, stop = shard_range(len(self.files), self.plan.rank, self.plan.world)
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            x = torch.stack([load_pil(self.files[j], self.image_size, None, False) for j in range(lo, hi)])
            yield x, self.labels[lo:hi]


def dali_available() -> bool:
    """Whether ``nvidia.dali`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def load_image_folder(
    root: Path | str,
    plan: BatchPlan,
    image_size: int = 224,
    val_fraction: float = 0.1,
    backend: Literal["auto", "dali", "pil"] = "auto",
) -> tuple[BatchSource, BatchSource, int]:
    """Training source, validation source and number of classes for an image folder.

    Args:
        root: the folder (layouts in the module docstring).
        plan: rank / world / micro-batch layout; its seed also fixes the single-folder split.
        image_size: side ``S`` of the square crops fed to the model.
        val_fraction: validation share of each class for a single-folder layout.
        backend: ``dali`` (error if missing), ``pil``, or ``auto`` (DALI when importable).

    Raises:
        FileNotFoundError / ValueError: from :func:`discover`; ValueError for an empty validation split, a bad
            ``image_size``, or an unknown backend; ImportError if ``backend="dali"`` and DALI is not installed.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    splits = discover(root, val_fraction, plan.seed)
    if not splits.val_files:
        raise ValueError(f"no validation images in {root}: add root/val/<class>/ or use val_fraction > 0")
    use = "dali" if backend == "auto" and dali_available() else "pil" if backend == "auto" else backend
    if use == "pil":
        train: BatchSource = PilImageBatches(splits.train_files, splits.train_labels, plan, image_size)
        val: BatchSource = PilImageBatches(splits.val_files, splits.val_labels, plan, image_size)
    elif use == "dali":
        if not dali_available():
            raise ImportError("backend='dali' needs NVIDIA DALI: pip install nvidia-dali-cuda130 (or ds_spngd[dali])")
        from ds_spngd_lab.data.image_dali import DaliImageBatches

        train = DaliImageBatches(splits.train_files, splits.train_labels, plan, image_size, train=True)
        val = DaliImageBatches(splits.val_files, splits.val_labels, plan, image_size, train=False)
    else:
        raise ValueError(f"unknown image backend {backend!r}; use auto, dali or pil")
    return train, val, len(splits.classes)
