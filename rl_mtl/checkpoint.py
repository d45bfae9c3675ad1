"""Atomic save / load of the complete training state."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A missing, truncated or corrupted checkpoint, with what to do about it."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``: a
    reader (or a run killed mid-write) only ever sees the old file or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """The saved state; ``mmap=True`` maps the tensors instead of reading them (cheap when only
    a counter such as ``step`` is wanted: a full MT10 checkpoint holds ~400 MB of replay)."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: the run never reached its first checkpoint; start it anew")
    try:
        # Our own file: it holds numpy RNG states and config dicts besides tensors.
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted ({type(err).__name__}: {err}); "
            "restore it from a backup, or delete the run directory to start over"
        ) from err
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not an rl-mtl checkpoint of format {FORMAT_VERSION}")
    return state
