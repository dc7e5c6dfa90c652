"""Shared fixtures: random Qwen3-Next checkpoints written once per test session."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (checkpoints.py, tokenizer_fixture.py)

from checkpoints import write_model  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Model folders by name, written on first use."""
    root = tmp_path_factory.mktemp("models")
    recipes = {
        # three shards: the index, shard boundaries and per-expert names all get exercised
        "tiny": dict(size="tiny", max_shard_bytes=150_000),
        "small": dict(size="small", seed=1, max_shard_bytes=2_000_000),
        "v5": dict(size="tiny", seed=2, style="v5"),
        "tied": dict(size="tiny", seed=3, tie_word_embeddings=True, mtp=False),
        "short_context": dict(size="tiny", seed=4, max_position_embeddings=48),
    }
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = write_model(root / name, **recipes[name])
        return made[name]

    return get


@pytest.fixture
def model_copy(models, tmp_path):
    """A writable copy of a fixture model, for tests that damage it."""

    def copy(name: str = "tiny") -> Path:
        return Path(shutil.copytree(models(name), tmp_path / name))

    return copy
