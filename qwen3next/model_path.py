"""Finding the model folder a user means: a path, or a hub id already in the local Hugging Face cache."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError, UsageError


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """A local folder as given, or the cached snapshot of a hub id like "Qwen/Qwen3-Next-80B-A3B-Instruct"."""
    if path is None:
        raise UsageError("no model given: pass --model PATH (a model folder or a downloaded hub id)")
    folder = Path(path).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise ConfigError(f"{folder}: is a file; --model takes a model folder")
        return folder
    if _looks_like_repo_id(str(path)):
        cached = _cached_snapshot(str(path))
        if cached is not None:
            return cached
        raise ConfigError(
            f"{path}: no such folder, and not in the local Hugging Face cache (run `qwen3next download {path}` first)"
        )
    raise ConfigError(f"{folder}: no such folder")


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def _cached_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        return None
