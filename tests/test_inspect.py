"""`qwen3next inspect`: figures checked against the checkpoint itself, the real 80B config, bad inputs."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
from huggingface_hub import constants

from checkpoints import write_model
from qwen3next.checkpoint_names import model_shapes
from qwen3next.config import Qwen3NextConfig
from qwen3next.inspection import count_parameters
from qwen3next.model_path import DEMO_MODEL
from qwen3next.weights import CheckpointReader
from test_cli import run_cli
from test_config import HUB_80B


@pytest.fixture
def cli(capsys):
    return lambda *args: run_cli([str(a) for a in args], capsys=capsys)


def inspect_json(cli, path) -> dict:
    code, out, err = cli("inspect", path, "--json")
    assert code == 0 and err == "", err
    return json.loads(out)


def test_the_tables_show_every_section(cli, models):
    code, out, err = cli("inspect", models("tiny"))
    assert code == 0 and err == ""
    for title in ("model", "layers", "parameters", "bytes per component", "bytes per dtype", "disk", "quantization"):
        assert f"\n{title}\n" in f"\n{out}", title
    assert "Gated DeltaNet      3  0-2" in out and "full attention      1  3" in out
    assert "Gated DeltaNet x3, full attention" in out
    assert "none (float32)" in out


def test_the_figures_agree_with_the_checkpoint(cli, models):
    folder = models("tiny")
    report = inspect_json(cli, folder)
    with CheckpointReader(folder) as reader:
        numel = {name: math.prod(reader.shape(name)) for name in reader.names()}
        tensor_bytes = reader.total_bytes()
    mtp = sum(n for name, n in numel.items() if name.startswith("mtp."))
    routed = sum(n for name, n in numel.items() if ".mlp.experts." in name and not name.startswith("mtp."))
    main = sum(numel.values()) - mtp
    assert report["parameters"] == {
        "total": main + mtp, "without_mtp": main, "mtp": mtp, "routed_experts": routed,
        "active_per_token": main - routed + routed * 2 // 8,  # top 2 of 8 experts
        "active_per_token_without_embeddings": main - routed + routed * 2 // 8 - 2 * 640 * 64,
    }
    components = report["components"]
    assert sum(c["parameters"] for c in components.values()) == main + mtp
    assert sum(c["bytes"] for c in components.values()) == tensor_bytes
    assert sum(c["tensors"] for c in components.values()) == len(numel)
    assert components["embeddings"]["parameters"] == components["lm_head"]["parameters"] == 640 * 64
    assert report["dtypes"] == {"float32": {"tensors": len(numel), "elements": main + mtp, "bytes": tensor_bytes}}
    assert report["layers"]["deltanet_layers"] == [0, 1, 2] and report["layers"]["full_attention_layers"] == [3]
    assert report["layers"]["moe_layers"] == [0, 1, 2, 3]
    assert report["disk"]["shards"] == 14 and report["disk"]["tensor_bytes"] == tensor_bytes
    assert report["model"]["mtp_layers"] == 1 and report["quantization"] is None


def test_bf16_without_mtp(cli, tmp_path):
    folder = write_model(tmp_path / "bf16", dtype=torch.bfloat16, mtp=False, tie_word_embeddings=True)
    code, out, _ = cli("inspect", folder)
    assert code == 0 and "none (bfloat16)" in out and "not in this checkpoint" in out
    report = inspect_json(cli, folder)
    assert report["parameters"]["mtp"] == 0 and "MTP" not in report["components"] and "lm_head" not in report["components"]
    assert list(report["dtypes"]) == ["bfloat16"]


def test_a_quantized_folder(cli, models, tmp_path):
    from qwen3next.quant.convert import quantize_checkpoint
    from qwen3next.quant.policy import Policy

    folder = tmp_path / "q4"
    quantize_checkpoint(models("tiny"), folder, Policy(4), progress=False)
    code, out, _ = cli("inspect", folder)
    assert code == 0
    assert "bytes per format" in out and "routed expert blobs" in out and "8-bit matrices" in out
    assert re.search(r"routed experts +gate 4-bit g64, up 4-bit g64, down 4-bit g32 \(5 layers: model\.layers\.0 \.\. "
                     r"mtp\.layers\.0\)", out)
    report = inspect_json(cli, folder)
    assert report["quantization"] == json.loads((folder / "config.json").read_text())["quantization"]
    assert report["parameters"]["total"] == inspect_json(cli, models("tiny"))["parameters"]["total"]

    config = json.loads((folder / "config.json").read_text())
    del config["quantization"]["experts"]["model.layers.2"]
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = cli("inspect", folder)
    assert code == 1 and "no valid layout for model.layers.2" in err


def test_a_hub_id_in_the_local_cache(cli, models, monkeypatch, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--tiny"
    shutil.copytree(models("tiny"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert inspect_json(cli, "org/tiny")["path"] == str(repo / "snapshots" / commit)


def _truncate_a_shard_header(folder):
    shard = folder / "model-00002-of-00014.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])


def _not_qwen3_next(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))


def _weights_of_another_config(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 96}))


@pytest.mark.parametrize("damage, target, message", [
    (None, "missing", "no such folder"),
    (None, "config.json", "is a file; inspect takes a model folder (config.json and safetensors shards)"),
    (lambda folder: (folder / "config.json").unlink(), "", "config.json: not found (a Qwen3-Next model folder needs"),
    (_not_qwen3_next, "", "model_type is 'llama', expected 'qwen3_next'"),
    (_truncate_a_shard_header, "", "model-00002-of-00014.safetensors: truncated (header claims"),
    (_weights_of_another_config, "", "checkpoint does not match the model: "),
])
def test_bad_inputs_are_one_line_errors(cli, model_copy, damage, target, message):
    folder = model_copy("tiny")
    if damage:
        damage(folder)
    code, out, err = cli("inspect", folder / target if target else folder)
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert err.startswith("qwen3next: error: ") and message in err, err


def test_the_80b_model_counts():
    """Qwen3-Next-80B-A3B on the meta device: 79.67B parameters without MTP, 1.65B MTP, 3.87B active.

    The "3B" of A3B is the active count without the embedding and lm_head matrices (3.25B)."""
    config = Qwen3NextConfig.from_dict(HUB_80B)
    counts = count_parameters(config, model_shapes(config, with_mtp=True))
    assert round(counts.main / 1e9, 2) == 79.67
    assert round(counts.mtp / 1e9, 2) == 1.65
    assert counts.components["routed experts"] == 48 * 512 * 3 * 2048 * 512
    assert counts.active == 3_874_929_408
    assert counts.active_without_embeddings == 3_252_599_552


def test_no_path_inspects_the_demo_model_and_says_so(cli):
    code, out, err = cli("inspect")
    assert code == 0 and str(DEMO_MODEL) in out
    assert "demo model" in err and "qwen3next download" in err
    code, out, err = cli("inspect", "--quiet")
    assert code == 0 and err == ""
