"""Artefact files: staged atomically (:func:`distillery.fsio.staged_file`) and measured."""

from __future__ import annotations

from pathlib import Path


def file_size(path: str | Path) -> int:
    """Bytes of the file at ``path`` (an exported artefact)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no artefact file at {path}")
    return path.stat().st_size
