"""Checkpoints: written atomically, loaded without unpickling arbitrary objects.

A checkpoint is a dict of tensors and plain values. It is written with :func:`distillery.fsio.atomic_write`:
to a temporary file with an unpredictable name in the same folder, flushed to disk, then renamed
over the target, so a crash at any moment leaves either the old checkpoint or the new one, never a
half-written file, and a failed write (a full disk) raises :class:`~distillery.fsio.WriteError`
naming the file and saying that the previous checkpoint is intact. Loading uses ``weights_only=True``.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from distillery.fsio import atomic_write, remove_stale_temps

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, tampered with, or of the wrong kind."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Atomically write ``state`` (plus a format version) to ``path``, creating its folder.

    Raises :class:`~distillery.fsio.WriteError` (an ``OSError``) if the file cannot be written; the
    previous checkpoint at ``path`` is then unchanged. Afterwards the temporary files of earlier
    writers of ``path`` that were killed mid-write (kill -9 skips their clean-up) are deleted; those
    of a writer still at work are not.
    """
    path = Path(path)
    atomic_write(path, lambda f: torch.save({"format_version": FORMAT_VERSION, **state}, f), make_parents=True,
                 what="checkpoint")
    remove_stale_temps(path)


def _load_safely(path: Path, map_location: str | torch.device) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused a global: nothing in the file was run
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"would call {found.group(1)} when loaded" if found else f"is refused ({str(err)[-200:]})"
        hint = ""
        if found and found.group(1).rsplit(".", 1)[-1][:1].isupper():  # a class: likely a whole pickled model
            hint = (f" If it is a whole model saved with torch.save(model), save its weights instead "
                    f"(torch.save(model.state_dict(), ...)) and name its class in the config as the model "
                    f"({found.group(1).rsplit('.', 1)[0]}:{found.group(1).rsplit('.', 1)[1]}, with --allow-code).")
        raise CheckpointError(
            f"{path}: refused: the file holds objects other than tensors and plain values (it {what}); it may "
            f"have been tampered with. It was not loaded and nothing in it was run.{hint}"
        ) from None
    except Exception as err:  # torch raises several types for truncated or corrupt files
        raise CheckpointError(
            f"{path}: cannot be loaded: the file is truncated or corrupt ({type(err).__name__}: {str(err)[:200]})"
        ) from None


def _is_run_checkpoint(state: Any) -> bool:
    return isinstance(state, dict) and state.get("format_version") == FORMAT_VERSION


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; refuse anything else clearly."""
    state = _load_safely(Path(path), map_location)
    if not _is_run_checkpoint(state):
        raise CheckpointError(f"{path}: not a distillery checkpoint (format_version {FORMAT_VERSION} expected)")
    return state


def load_weights(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict | None]:
    """Network weights from a distillery checkpoint or a plain ``state_dict`` file.

    Returns ``(state_dict, meta)``; ``meta`` (the model spec and run details) is None for a plain
    state_dict.
    """
    state = _load_safely(Path(path), map_location)
    if _is_run_checkpoint(state):
        weights = state.get("student")
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            found = "has none" if weights is None else f"holds a {type(weights).__name__} there"
            raise CheckpointError(f"{path}: a distillery checkpoint without the student's weights (its 'student' "
                                  f"entry {found}, a dict of tensors was expected)")
        return weights, state.get("meta", {})
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return state, None
    raise CheckpointError(f"{path}: neither a distillery checkpoint nor a state_dict of tensors")


def load_model_state(model: torch.nn.Module, state_dict: dict[str, Any], source: str) -> None:
    """``model.load_state_dict`` with a message that names the file and the mismatching keys."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        first = str(err).splitlines()[0:4]
        raise CheckpointError(
            f"{source}: the weights do not fit a {type(model).__name__} as configured (another architecture, "
            f"width or class count?): {' '.join(line.strip() for line in first)[:400]}"
        ) from None
