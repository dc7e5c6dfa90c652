"""Shared fixtures: random Qwen3-Next checkpoints written once per test session.

Only `qwen3next.*` may resolve: the repository's cli/, quant/ and offload/ folders install as
qwen3next.cli etc., but with the repository root on sys.path (`python -m pytest` puts the current
folder there) they would also import as top-level `cli`, `quant` and `offload`, and a class could
exist twice. So the root leaves sys.path before anything is imported from it; `qwen3next` itself
resolves through the installed package (an editable install maps it by name, not by sys.path).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
_TOP_LEVEL = ("cli", "quant", "offload")  # repository folders that are packages only under qwen3next
_imported = [name for name in _TOP_LEVEL if name in sys.modules]
if _imported:
    raise RuntimeError(f"tests/conftest.py: {', '.join(_imported)} already imported as top-level package(s); "
                       "import them as qwen3next.cli / qwen3next.quant / qwen3next.offload")
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _ROOT]
sys.path.insert(0, str(Path(__file__).parent))  # test helpers (checkpoints.py, tokenizer_fixture.py)

import pytest  # noqa: E402
import torch  # noqa: E402


def _isolated_cache() -> None:
    """Tests write router statistics into a cache folder of their own (inherited by subprocesses), while
    the compiled kernels stay in the user's cache, so each session does not compile them again."""
    import atexit
    import shutil
    import tempfile

    user = Path(os.environ.get("QWEN3NEXT_CACHE") or Path.home() / ".cache" / "qwen3next")
    (user / "kernels").mkdir(parents=True, exist_ok=True)
    isolated = Path(tempfile.mkdtemp(prefix="qwen3next-test-cache-"))
    (isolated / "kernels").symlink_to(user / "kernels", target_is_directory=True)
    os.environ["QWEN3NEXT_CACHE"] = str(isolated)
    atexit.register(shutil.rmtree, isolated, ignore_errors=True)  # the link to the kernels goes, not the kernels


_isolated_cache()

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
