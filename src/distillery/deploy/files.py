"""Artefact files written atomically: staged under a temporary name, moved into place only once checked."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on a normal exit move it onto ``path``.

    The caller writes the temporary file and verifies it inside the block. If the block raises (a
    failed verification), the temporary file is deleted and ``path`` keeps whatever it held before:
    a file at ``path`` is always a complete, verified artefact. The move is ``os.replace`` (atomic
    on one file system), after an fsync of the file's contents.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        tmp.touch(exist_ok=False)
        # The mode any new file gets here (0o666 less the umask); some writers (safetensors) replace
        # the file with an owner-only one, so it is restored before the move.
        mode = tmp.stat().st_mode & 0o777
        yield tmp
        os.chmod(tmp, mode)
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
