"""Finding the model folder a user means: a path, or a hub id already in the local Hugging Face cache."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError, UsageError


DEMO_MODEL = Path(__file__).parent / "demo_model"
DEMO_NOTICE = (
    "using the embedded demo model (a 19M-parameter Qwen3-Next trained on Austen, Shakespeare and Milton); "
    "for the real one: qwen3next download Qwen/Qwen3-Next-80B-A3B-Instruct, then --model Qwen/Qwen3-Next-80B-A3B-Instruct"
)


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """A local folder as given, the cached snapshot of a hub id like "Qwen/Qwen3-Next-80B-A3B-Instruct",
    or (for None) the demo model shipped in the package."""
    if path is None:
        if not (DEMO_MODEL / "config.json").is_file():
            raise UsageError("no model given and no demo model installed: pass --model PATH")
        return DEMO_MODEL
    folder = Path(path).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise ConfigError(f"{folder}: is a file; --model takes a model folder")
        return folder
    if looks_like_repo_id(str(path)):
        cached = _cached_snapshot(str(path))
        if cached is not None:
            return cached
        raise ConfigError(
            f"{path}: no such folder, and not in the local Hugging Face cache (run `qwen3next download {path}` first)"
        )
    raise ConfigError(f"{folder}: no such folder")


def looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def _cached_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        return None


def user_cache() -> Path:
    """qwen3next's own cache folder (compiled kernels, router statistics): $QWEN3NEXT_CACHE, else
    ~/.cache/qwen3next."""
    return Path(os.environ.get("QWEN3NEXT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qwen3next"))
