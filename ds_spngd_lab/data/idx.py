"""Reader (and writer) for the IDX format of LeCun's MNIST files, also used by Fashion-MNIST.

Layout (all integers big-endian)::

    bytes 0-1   0x00 0x00
    byte  2     element type: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64
    byte  3     number of dimensions n (>= 1)
    n x uint32  the sizes of the dimensions
    data        prod(sizes) elements of that type, big-endian, C order

Files may be gzip-compressed (detected from the gzip magic bytes ``1f 8b``, whatever the file name says).
Reference: http://yann.lecun.com/exdb/mnist/ ("THE IDX FILE FORMAT").
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["IDX_DTYPES", "read_idx", "write_idx"]

#: IDX element-type code -> big-endian numpy dtype of the stored data
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_HEADER = 4


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it starts with the gzip magic bytes.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file looks gzipped but cannot be decompressed (truncated or corrupt).
    """
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"IDX file {path}: gzip data is truncated or corrupt ({exc})") from None


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (plain or gzip) into a numpy array.

    Args:
        path: the file.

    Returns:
        An array of the file's shape ``(d_0, ..., d_{n-1})`` in native byte order; dtype from the type code
        (``uint8`` for MNIST / Fashion-MNIST images and labels).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: naming the file and what is wrong: not IDX (first two bytes not zero), unknown element type,
            zero dimensions, header shorter than its dimension list, fewer data bytes than the dimensions require,
            or bytes left over after the data; also corrupt gzip data.
    """
    file = Path(path)
    data = _read_bytes(file)
    if len(data) < _HEADER:
        raise ValueError(f"IDX file {file}: {len(data)} bytes is shorter than the 4-byte magic number")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0:
        raise ValueError(
            f"IDX file {file}: bad magic number 0x{data[:4].hex()} (an IDX file starts with two zero bytes)"
        )
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(f"IDX file {file}: unknown element type 0x{code:02X} in the magic number (known: {known})")
    if ndim == 0:
        raise ValueError(f"IDX file {file}: the magic number declares 0 dimensions")
    end_of_dims = _HEADER + 4 * ndim
    if len(data) < end_of_dims:
        raise ValueError(
            f"IDX file {file}: truncated header: {ndim} dimensions need {end_of_dims} header bytes, "
            f"the file has {len(data)}"
        )
    shape = struct.unpack(f">{ndim}I", data[_HEADER:end_of_dims])
    dtype = IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    available = len(data) - end_of_dims
    if available < expected:
        raise ValueError(
            f"IDX file {file}: truncated data: shape {shape} of {dtype.newbyteorder('=')} needs {expected} bytes, "
            f"the file has {available} after the header"
        )
    if available > expected:
        raise ValueError(
            f"IDX file {file}: {available - expected} unexpected bytes after the data of shape {shape} "
            f"(the header does not describe the whole file)"
        )
    array = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=end_of_dims).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike[str], array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file (for tests and small data sets of your own).

    Args:
        path: destination file.
        array: at least 1-D, at most 255-D, with a dtype of :data:`IDX_DTYPES` (any byte order).
        compress: gzip the file; ``None`` gzips when the name ends in ``.gz``.

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        ValueError: a 0-D or >255-D array, a dimension over 2³²−1, or a dtype IDX cannot store.
    """
    file = Path(path)
    arr = np.asarray(array)
    if not 1 <= arr.ndim <= 255:
        raise ValueError(f"IDX stores 1 to 255 dimensions, got an array of shape {arr.shape}")
    if any(d >= 2**32 for d in arr.shape):
        raise ValueError(f"IDX dimensions are uint32, got shape {arr.shape}")
    codes = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
    code = codes.get(arr.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {arr.dtype} (uint8, int8, int16, int32, float32, float64)")
    payload = (
        bytes([0, 0, code, arr.ndim])
        + struct.pack(f">{arr.ndim}I", *arr.shape)
        + np.ascontiguousarray(arr, dtype=IDX_DTYPES[code]).tobytes()
    )
    if compress if compress is not None else file.name.endswith(".gz"):
        payload = gzip.compress(payload)
    file.write_bytes(payload)
    return file
