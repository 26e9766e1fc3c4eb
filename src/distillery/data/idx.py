"""Reader for the idx format of (Fashion-)MNIST, plain or gzip-compressed.

Format: 2 zero bytes, a type byte (0x08 = uint8), a byte giving the number of dimensions, then one
big-endian uint32 per dimension, then the data in C order.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IdxFormatError(ValueError):
    """The file is not a valid (or complete) idx file."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read a whole idx / idx.gz file into a numpy array of its declared shape."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise IdxFormatError(f"{path}: cannot read ({err}); the file is truncated or corrupt") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IdxFormatError(f"{path}: not an idx file (bad magic number)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _DTYPES:
        raise IdxFormatError(f"{path}: unknown idx data type 0x{type_code:02x}")
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise IdxFormatError(f"{path}: truncated header")
    shape = struct.unpack(f">{ndim}I", raw[4:header_end])
    dtype = np.dtype(_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header_end != expected:
        raise IdxFormatError(
            f"{path}: header declares shape {shape} ({expected} bytes of data) "
            f"but the file holds {len(raw) - header_end}; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape).copy()
