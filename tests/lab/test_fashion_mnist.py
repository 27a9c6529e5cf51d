"""The IDX reader (ds_spngd_lab.data.idx) on files built byte by byte here, and the Fashion-MNIST loader on the real
files of the Debian package ``dataset-fashion-mnist`` (skipped where it is not installed)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ds_spngd_lab.data import fashion_mnist as fm
from ds_spngd_lab.data.idx import read_idx, write_idx
from tests.support.harness import load_script

ROOT = Path(__file__).resolve().parents[2]


def _idx_bytes(code: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    """An IDX file written from the format's definition (independent of write_idx)."""
    return bytes([0, 0, code, len(shape)]) + b"".join(struct.pack(">I", d) for d in shape) + payload


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


# ---------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("gz", [False, True])
def test_reads_hand_built_uint8_images_and_labels(tmp_path: Path, gz: bool) -> None:
    images = _images(5)
    labels = np.array([3, 0, 9, 9, 1], dtype=np.uint8)
    for name, arr, code in (("img", images, 0x08), ("lab", labels, 0x08)):
        raw = _idx_bytes(code, arr.shape, arr.tobytes())  # uint8: byte order does not matter
        (tmp_path / name).write_bytes(gzip.compress(raw) if gz else raw)
    got_images, got_labels = read_idx(tmp_path / "img"), read_idx(tmp_path / "lab")
    assert got_images.dtype == np.uint8 and got_images.shape == (5, 28, 28)
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)


def test_reads_big_endian_wider_types(tmp_path: Path) -> None:
    values = [1, -2, 300, -70000]
    path = tmp_path / "i32"
    path.write_bytes(_idx_bytes(0x0C, (2, 2), struct.pack(">4i", *values)))
    out = read_idx(path)
    assert out.dtype == np.int32 and out.dtype.isnative and out.tolist() == [[1, -2], [300, -70000]]
    path.write_bytes(_idx_bytes(0x0D, (3,), struct.pack(">3f", 0.5, -1.25, 3.0)))
    assert read_idx(path).tolist() == [0.5, -1.25, 3.0]


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_write_read_round_trip(tmp_path: Path, dtype: type, name: str) -> None:
    arr = (np.arange(2 * 3 * 4) - 7).astype(dtype).reshape(2, 3, 4)
    path = write_idx(tmp_path / name, arr)
    assert path.read_bytes().startswith(b"\x1f\x8b") == name.endswith(".gz")
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and np.array_equal(out, arr)
    # the plain file is exactly the format's definition
    plain = write_idx(tmp_path / "plain", arr, compress=False).read_bytes()
    assert plain == _idx_bytes(plain[2], arr.shape, arr.astype(np.dtype(dtype).newbyteorder(">")).tobytes())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00\x00", "shorter than the 4-byte magic"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "bad magic number 0x01000801"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "unknown element type 0x07"),
        (b"\x00\x00\x08\x00", "declares 0 dimensions"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 10), "truncated header: 3 dimensions need 16"),
        (_idx_bytes(0x08, (4, 28, 28), bytes(4 * 784 - 1)), "truncated data: shape (4, 28, 28)"),
        (_idx_bytes(0x0C, (2,), bytes(7)), "needs 8 bytes, the file has 7"),
        (_idx_bytes(0x08, (3,), bytes(5)), "2 unexpected bytes after the data"),
    ],
)
def test_malformed_files_name_file_and_problem(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "broken-idx"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="broken-idx") as err:
        read_idx(path)
    assert message in str(err.value)


def test_truncated_gzip_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(_idx_bytes(0x08, (100,), bytes(100)))[:-12])
    with pytest.raises(ValueError, match=r"cut.gz: gzip data is truncated or corrupt"):
        read_idx(path)
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "absent")


def test_write_refuses_what_idx_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot store dtype int64"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="1 to 255 dimensions"):
        write_idx(tmp_path / "x", np.array(3, dtype=np.uint8))


# ---------------------------------------------------------------- Fashion-MNIST loader on small fake files


def _fake_dataset(root: Path, n_train: int = 30, n_test: int = 10, gz: bool = True) -> dict[str, np.ndarray]:
    arrays = {
        "train_images": _images(n_train, 1),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": _images(n_test, 2),
        "test_labels": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for key, stem in fm.FILES.items():
        write_idx(root / (f"{stem}.gz" if gz else stem), arrays[key])
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_loader_splits_normalises_and_reads_env_var(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gz: bool
) -> None:
    arrays = _fake_dataset(tmp_path / "fm", gz=gz)
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "fm"))
    splits = fm.load_fashion_mnist(valid_size=10)
    assert splits.train_x.shape == (20, 1, 28, 28) and splits.valid_x.shape == (10, 1, 28, 28)
    assert splits.test_x.shape == (10, 1, 28, 28) and splits.train_x.dtype == torch.float32
    assert splits.train_y.dtype == torch.int64
    assert splits.train_y.tolist() == arrays["train_labels"][:20].tolist()
    assert splits.valid_y.tolist() == arrays["train_labels"][20:].tolist()
    assert splits.test_y.tolist() == arrays["test_labels"].tolist()
    pixels = arrays["train_images"][:20].astype(np.float64) / 255.0  # statistics of the train split only
    assert splits.mean == pytest.approx(pixels.mean()) and splits.std == pytest.approx(pixels.std())
    expected_test = (arrays["test_images"].astype(np.float64) / 255.0 - pixels.mean()) / pixels.std()
    assert np.allclose(splits.test_x.numpy()[:, 0], expected_test, atol=1e-5)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda a: a.update(train_labels=a["train_labels"][:-1]), "has 29 labels but .* has 30 images"),
        (lambda a: a.update(test_labels=a["test_labels"] + 10), r"labels must lie in \[0, 9\]"),
        (lambda a: a.update(train_images=a["train_images"][:, :, :27]), r"shape \(N>0, 28, 28\)"),
        (lambda a: a.update(test_labels=a["test_labels"].astype(np.int32)), "expected uint8 labels"),
    ],
)
def test_loader_rejects_inconsistent_files(tmp_path: Path, corrupt: object, message: str) -> None:
    arrays = _fake_dataset(tmp_path)
    corrupt(arrays)  # type: ignore[operator]
    for key, stem in fm.FILES.items():
        write_idx(tmp_path / f"{stem}.gz", arrays[key])
    with pytest.raises(ValueError, match=message):
        fm.load_fashion_mnist(tmp_path, valid_size=5)


def test_missing_data_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        fm.find_fashion_mnist_dir()
    text = str(err.value)
    assert f"{fm.ENV_VAR}={tmp_path}" in text and "t10k-labels-idx1-ubyte" in text
    assert "apt-get install dataset-fashion-mnist" in text
    monkeypatch.delenv(fm.ENV_VAR)
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere .*the Debian package's folder"):
        fm.find_fashion_mnist_dir()


def test_train_py_dataset_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train = load_script(module_name="ds_spngd_train_script_fm")
    args = train.parse_args(["--deepspeed_config", "x.json", "--dataset", "fashion-mnist"])
    assert train.dataset_name(args) == "fashion-mnist"
    assert train.dataset_name(train.parse_args(["--deepspeed_config", "x.json"])) == "mnist"
    with pytest.raises(SystemExit):
        train.parse_args(["--deepspeed_config", "x.json", "--dataset", "fashion-mnist", "--data-path", "d"])
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        train.open_data(args)
    _fake_dataset(tmp_path / "fm", n_train=10_040, gz=False)
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "fm"))
    n_train, _, classes, channels, size = train.open_data(args)
    assert (n_train, classes, channels, size) == (40, 10, 1, 28)  # the last 10,000 are held out as validation


# ---------------------------------------------------------------- the real data set


def _installed_dir() -> Path | None:
    try:
        return fm.find_fashion_mnist_dir()
    except FileNotFoundError:
        return None


needs_data = pytest.mark.skipif(
    _installed_dir() is None, reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)"
)


@needs_data
def test_real_files_shapes_labels_and_class_balance() -> None:
    raw = fm.read_fashion_mnist()
    assert raw["train_images"].shape == (60_000, 28, 28) and raw["train_images"].dtype == np.uint8
    assert raw["test_images"].shape == (10_000, 28, 28)
    assert raw["train_labels"].shape == (60_000,) and raw["test_labels"].shape == (10_000,)
    assert np.bincount(raw["train_labels"], minlength=10).tolist() == [6000] * 10
    assert np.bincount(raw["test_labels"], minlength=10).tolist() == [1000] * 10
    assert int(raw["train_images"].max()) == 255 and int(raw["train_images"].min()) == 0


@needs_data
def test_real_loader_splits_and_statistics() -> None:
    splits = fm.load_fashion_mnist()
    assert (len(splits.train_y), len(splits.valid_y), len(splits.test_y)) == (50_000, 10_000, 10_000)
    for y in (splits.train_y, splits.valid_y, splits.test_y):
        assert int(y.min()) == 0 and int(y.max()) == 9
    assert abs(float(splits.train_x.mean())) < 1e-4 and abs(float(splits.train_x.std()) - 1.0) < 1e-3
    # measured on the 50,000 train images (pixels in [0, 1]): mean 0.28550, std 0.35278
    assert splits.mean == pytest.approx(0.28550, abs=1e-4) and splits.std == pytest.approx(0.35278, abs=1e-4)
