"""Artefact files written atomically: staged under a temporary name, moved into place only once checked."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on a normal exit move it onto ``path``.

    The caller writes and verifies the temporary file inside the block. If the block raises (a
    failed verification), the temporary file is deleted and ``path`` keeps whatever it held before:
    a file at ``path`` is always a complete, verified artefact. The move is ``os.replace`` (atomic
    on one file system), after an fsync of the file's contents.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_size(path: str | Path) -> int:
    """Bytes of the file at ``path`` (an exported artefact)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no artefact file at {path}")
    return path.stat().st_size
