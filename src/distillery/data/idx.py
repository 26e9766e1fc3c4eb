"""Reader for the idx format of (Fashion-)MNIST, plain or gzip-compressed.

Format: 2 zero bytes, a type byte (0x08 = uint8), a byte giving the number of dimensions, then one
big-endian uint32 per dimension, then the data in C order.

The header is read and checked first, and the data size it declares is bounded
(:data:`MAX_PAYLOAD_BYTES`) before anything is allocated; the data is then read, or inflated, in
chunks into a buffer of exactly that size, so a small file claiming (or a gzip bomb inflating to)
gigabytes costs no more memory than the declared, bounded size.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MAX_PAYLOAD_BYTES = 2 << 30
"""Largest data size an idx file may declare (the Fashion-MNIST training images are 47 MB)."""
_CHUNK = 1 << 20


class IdxFormatError(ValueError):
    """The file is not a valid (or complete) idx file."""


def read_idx(path: str | Path, max_bytes: int = MAX_PAYLOAD_BYTES) -> np.ndarray:
    """Read a whole idx / idx.gz file into a numpy array of its declared shape.

    Raises :class:`IdxFormatError` (naming the file) for a bad header, declared data larger than
    ``max_bytes``, or data that is shorter or longer than declared.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as stream:
            shape, dtype, header_size = _read_header(stream, path, max_bytes)
            declared = math.prod(shape) * dtype.itemsize
            if path.suffix != ".gz":  # the size on disk tells before anything is read
                _check_length(path, shape, declared, os.fstat(stream.fileno()).st_size - header_size)
            payload = _read_payload(stream, path, shape, declared)
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise IdxFormatError(f"{path}: cannot read ({err}); the file is truncated or corrupt") from err
    return payload.view(dtype).reshape(shape)


def _read_header(stream: BinaryIO, path: Path, max_bytes: int) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header size in bytes), the declared data size checked against ``max_bytes``."""
    magic = stream.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0:
        raise IdxFormatError(f"{path}: not an idx file (bad magic number)")
    type_code, ndim = magic[2], magic[3]
    if type_code not in _DTYPES:
        raise IdxFormatError(f"{path}: unknown idx data type 0x{type_code:02x}")
    dims = stream.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise IdxFormatError(f"{path}: truncated header")
    shape = struct.unpack(f">{ndim}I", dims)
    dtype = np.dtype(_DTYPES[type_code])
    declared = math.prod(shape) * dtype.itemsize
    if declared > max_bytes:
        raise IdxFormatError(
            f"{path}: header declares shape {shape} ({declared:,} bytes of data), more than the {max_bytes:,} "
            "bytes an idx file may hold here; the file is corrupt or not a dataset of this kind"
        )
    return shape, dtype, 4 + 4 * ndim


def _read_payload(stream: BinaryIO, path: Path, shape: tuple[int, ...], declared: int) -> np.ndarray:
    """The ``declared`` bytes that follow the header, read in chunks; refused if there are fewer or more."""
    buffer = np.empty(declared, dtype=np.uint8)
    view = memoryview(buffer)
    filled = 0
    while filled < declared:
        got = stream.readinto(view[filled: filled + _CHUNK])
        if not got:
            break
        filled += got
    more = filled == declared and stream.read(1) != b""
    _check_length(path, shape, declared, None if more else filled)
    return buffer


def _check_length(path: Path, shape: tuple[int, ...], declared: int, found: int | None) -> None:
    """Refuse data of ``found`` bytes (None: more than declared) when the header declares ``declared``."""
    if found == declared:
        return
    holds = "more than that" if found is None else str(found)
    raise IdxFormatError(
        f"{path}: header declares shape {shape} ({declared} bytes of data) "
        f"but the file holds {holds}; the file is truncated or corrupt"
    )
