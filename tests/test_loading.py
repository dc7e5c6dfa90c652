"""Loading model folders: what loads, and every damaged folder gives one clear error."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen3next
from qwen3next.errors import CheckpointError, ConfigError, UsageError
from qwen3next.loader import load_model

INDEX = "model.safetensors.index.json"


def read_index(folder):
    return json.loads((folder / INDEX).read_text())


def write_index(folder, index):
    (folder / INDEX).write_text(json.dumps(index))


def rewrite_tensor(folder, name, change):
    """Replace one tensor inside its shard: change(tensor) -> (new name, new tensor) or None to drop it."""
    shard = folder / read_index(folder)["weight_map"][name]
    tensors = load_file(shard)
    replacement = change(tensors.pop(name))
    if replacement is not None:
        tensors[replacement[0]] = replacement[1]
    save_file(tensors, shard, metadata={"format": "pt"})


def test_loads_sharded_checkpoint_with_mtp(models):
    folder = models("tiny")
    assert len(list(folder.glob("model-*-of-*.safetensors"))) >= 3
    model, store, plan = load_model(folder, "float32", progress=False)
    assert plan is None  # an unquantized folder loads whole
    assert model.mtp is not None
    layers = model.config.num_hidden_layers
    mtp_experts = store.layers[layers]  # the MTP layer's experts come after the main layers
    assert mtp_experts.gate_up.shape == (8, 64, 64) and mtp_experts.down.shape == (8, 64, 32)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_loads_checkpoint_without_mtp_and_tied_head(models):
    model, _, _ = load_model(models("tied"), "bfloat16", progress=False)
    assert model.mtp is None and model.lm_head is None
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_folder_without_config(model_copy):
    folder = model_copy()
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json: not found"):
        qwen3next.load(folder)


def test_config_of_another_model(model_copy):
    folder = model_copy()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, model_type="qwen3_moe")))
    with pytest.raises(ConfigError, match="model_type is 'qwen3_moe'"):
        qwen3next.load(folder)


def test_truncated_shard(model_copy):
    folder = model_copy()
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=shard.name):
        qwen3next.load(folder)


def test_index_naming_a_missing_shard(model_copy):
    folder = model_copy()
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        qwen3next.load(folder)


@pytest.mark.parametrize("escape", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../x.safetensors"])
def test_index_escaping_the_folder(model_copy, escape):
    folder = model_copy()
    index = read_index(folder)
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = escape
    write_index(folder, index)
    with pytest.raises(CheckpointError, match="outside|escape"):
        qwen3next.load(folder)


def test_tensor_of_the_wrong_shape(model_copy):
    folder = model_copy()
    name = "model.layers.0.linear_attn.out_proj.weight"
    rewrite_tensor(folder, name, lambda t: (name, t[:, :-1].contiguous()))
    with pytest.raises(CheckpointError, match=rf"{name}: got \(64, 63\), expected \(64, 64\)"):
        qwen3next.load(folder)


def test_missing_and_unexpected_tensors_are_listed_together(model_copy):
    folder = model_copy()
    missing = "model.layers.1.mlp.experts.3.up_proj.weight"
    rewrite_tensor(folder, missing, lambda t: ("model.layers.1.mlp.bogus.weight", t))
    index = read_index(folder)
    index["weight_map"]["model.layers.1.mlp.bogus.weight"] = index["weight_map"].pop(missing)
    write_index(folder, index)
    with pytest.raises(CheckpointError) as error:
        qwen3next.load(folder)
    message = str(error.value)
    assert "\n" not in message
    assert missing in message and "model.layers.1.mlp.bogus.weight" in message


@pytest.mark.parametrize("damage", ["missing", "mis-shaped"])
def test_a_partial_or_mis_shaped_mtp_head_is_named(model_copy, damage):
    """The MTP head is optional, but a checkpoint that has some of it must have all of it, in the right shapes."""
    folder = model_copy()
    name = "mtp.layers.0.self_attn.o_proj.weight"
    if damage == "missing":
        rewrite_tensor(folder, name, lambda t: ("mtp.layers.0.self_attn.o_proj.bogus", t))
        index = read_index(folder)
        index["weight_map"]["mtp.layers.0.self_attn.o_proj.bogus"] = index["weight_map"].pop(name)
        write_index(folder, index)
    else:
        rewrite_tensor(folder, name, lambda t: (name, t[:, :-1].contiguous()))
    with pytest.raises(CheckpointError) as error:
        qwen3next.load(folder)
    assert name in str(error.value) and "\n" not in str(error.value)


def test_bad_dtype_is_a_usage_error(models):
    with pytest.raises(UsageError, match="int8"):
        qwen3next.load(models("tiny"), dtype="int8")


def test_missing_path_and_file_path(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        qwen3next.load(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        qwen3next.load(tmp_path / "file")


def test_hub_id_from_the_local_cache(models, tmp_path, monkeypatch):
    """A hub id resolves to its snapshot in the Hugging Face cache, without any network access."""
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--someone--tiny-qwen3next" / "snapshots" / "0123abcd"
    snapshot.parent.mkdir(parents=True)
    os.symlink(models("tiny"), snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    engine = qwen3next.load("someone/tiny-qwen3next", dtype="float32")
    assert engine.folder == snapshot
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        qwen3next.load("someone/not-downloaded")
