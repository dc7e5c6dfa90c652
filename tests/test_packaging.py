"""One import namespace: the repository's cli/, quant/ and offload/ exist only as qwen3next.* (tests/conftest.py)."""

import importlib

import pytest


@pytest.mark.parametrize("name", ["cli", "quant", "offload"])
def test_repository_folders_import_only_under_qwen3next(name):
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(name)
    assert importlib.import_module(f"qwen3next.{name}").__name__ == f"qwen3next.{name}"
