"""`qwen3next quantize`: the on-disk format, the quantized model's numbers, resume, memory and bad inputs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import qwen3next
from checkpoints import write_model
from qwen3next.cli.main import main
from qwen3next.quant import int4, int8
from qwen3next.quant.convert import quantize_checkpoint
from qwen3next.quant.modules import QuantizedLinear
from qwen3next.quant.policy import Policy
from qwen3next.quant.simulate import fake_quantize_
from qwen3next.weights import CheckpointReader


@pytest.fixture(scope="module")
def quantized(models, tmp_path_factory):
    """The three-shard tiny fixture at 4 and 8 bits (default policy), written once."""
    root = tmp_path_factory.mktemp("quantized")
    folders = {bits: root / f"q{bits}" for bits in (4, 8)}
    for bits, folder in folders.items():
        quantize_checkpoint(models("tiny"), folder, Policy(bits), progress=False)
    return folders


def cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors header parsed by hand, as a program without our code would: (entries, data start)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)), 8 + length


# ---- the format, read the way docs/format.md describes it ----

def test_each_expert_is_one_aligned_byte_range_that_decodes_per_the_spec(models, quantized):
    src, out = models("tiny"), quantized[4]
    config = json.loads((out / "config.json").read_text())
    section = config["quantization"]
    assert section["format"] == "qwen3next" and section["format_version"] == 1 and section["bits"] == 4
    hidden, inter = config["hidden_size"], config["moe_intermediate_size"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.2.mlp.experts.5.packed"
    shard = out / index[name]
    entries, data_start = read_header(shard)
    begin, end = entries[name]["data_offsets"]
    assert entries[name]["dtype"] == "U8" and (data_start + begin) % 64 == 0
    blob = np.fromfile(shard, dtype=np.uint8, count=end - begin, offset=data_start + begin)

    # walk the blob: gate, up, down; each codes, scale, minimum; every array starting at a multiple of 64
    cursor, layout = 0, section["experts"]["model.layers.2"]
    with CheckpointReader(src) as reader:
        for projection, (rows, cols) in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                                         ("down_proj", (hidden, inter))):
            group = layout[projection]["group"]
            arrays = []
            for dtype, count in ((np.uint8, rows * cols // 2), (np.float16, rows * cols // group),
                                 (np.float16, rows * cols // group)):
                size = count * np.dtype(dtype).itemsize
                arrays.append(torch.from_numpy(blob[cursor:cursor + size].view(dtype).copy()))
                cursor = -(-(cursor + size) // 64) * 64
            codes, scale, minimum = arrays
            source = reader.read(f"model.layers.2.mlp.experts.5.{projection}.weight").float()
            expected = int4.quantize(source, group)
            assert torch.equal(codes.view(rows, cols // 2), expected[0])
            assert torch.equal(scale.view(rows, -1), expected[1]) and torch.equal(minimum.view(rows, -1), expected[2])
    assert cursor == end - begin  # nothing else in the blob


def test_dense_matrices_and_kept_tensors(models, quantized):
    with CheckpointReader(models("tiny")) as src, CheckpointReader(quantized[8]) as out:
        name = "model.layers.3.self_attn.q_proj.weight"
        q, scale = out.read(f"{name}.q8"), out.read(f"{name}.scale")
        expected = int8.quantize(src.read(name).float())
        assert torch.equal(q, expected[0]) and torch.equal(scale, expected[1])
        for kept in ("model.layers.0.mlp.gate.weight", "model.layers.0.linear_attn.A_log", "model.norm.weight",
                     "model.layers.0.linear_attn.conv1d.weight", "model.layers.0.mlp.shared_expert_gate.weight"):
            assert kept in out and torch.equal(out.read(kept), src.read(kept)), kept
        assert not any(n.endswith("_proj.weight") and ".experts." in n for n in out.names())


def test_tokenizer_and_generation_files_are_carried_over(models, quantized):
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (quantized[4] / name).read_bytes() == (models("tiny") / name).read_bytes()
    assert not [p.name for p in quantized[4].iterdir() if p.name.startswith(".")]


# ---- the quantized model computes what the format stores ----

@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_model_equals_the_source_with_round_tripped_weights(models, quantized, bits):
    """fp32 activations: the dequantizing path must reproduce exactly the fake-quantized source model."""
    reference = qwen3next.load(models("tiny"), dtype="float32")
    fake_quantize_(reference.model, reference.expert_store, Policy(bits).bits)
    engine = qwen3next.load(quantized[bits], dtype="float32")
    ids = list(range(3, 70))
    torch.testing.assert_close(engine.logits(ids), reference.logits(ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_decode_kernels_agree_with_the_dequantized_weights(models, tmp_path, bits):
    """One bf16 token on the CPU runs the 4/8-bit kernels: compare them with fp32 math on the dequantized weights."""
    folder = tmp_path / f"q{bits}"  # lm_head at --bits too, so a dense matrix runs each kernel
    quantize_checkpoint(models("tiny"), folder, Policy(bits, bits_for=[("lm_head.weight", bits)]), progress=False)
    engine = qwen3next.load(folder, dtype="bfloat16")
    generator = torch.Generator().manual_seed(bits)
    linears = [m for m in engine.model.modules() if type(m) is QuantizedLinear]
    assert {m.bits for m in linears} == {8, bits}
    with torch.no_grad():
        for module in linears:
            x = torch.randn(1, module.in_features, generator=generator).bfloat16()
            expected = torch.nn.functional.linear(x.float(), module.dequantized(torch.float32))
            assert (module(x).float() - expected).abs().max() < 0.01 * expected.abs().max() + 1e-3
        store, layer = engine.expert_store, 2
        x = torch.randn(1, engine.model.config.hidden_size, generator=generator).bfloat16()
        ids, weights = torch.tensor([[6, 1]]), torch.tensor([[0.6, 0.4]])
        expected = store.run(layer, x.float(), ids, weights)  # fp32 input: the dequantizing path
        got = store.run(layer, x, ids, weights).float()
        assert (got - expected).abs().max() < 0.01 * expected.abs().max() + 1e-3
        assert store.compute.layouts[layer].projections["down_proj"].bits == bits


@pytest.mark.slow
def test_8_bit_costs_little_more_than_bf16_rounding_on_random_weights(models, tmp_path):
    """Random fixtures have sharp, fragile logits (bf16 rounding alone moves them): compare against that."""
    src, ids = models("small"), list(range(3, 131))
    reference = qwen3next.load(src, dtype="float32").logits(ids).float().log_softmax(-1)

    def kl(folder: Path, dtype: str) -> float:
        candidate = qwen3next.load(folder, dtype=dtype).logits(ids).float().log_softmax(-1)
        return (reference.exp() * (reference - candidate)).sum(-1).mean().item()

    quantize_checkpoint(src, tmp_path / "q8", Policy(8), progress=False)
    assert kl(tmp_path / "q8", "float32") < 4 * kl(src, "bfloat16")


DEMO_TEXTS = {"heldout.txt": 4096, "heldout_modern.txt": None}  # tests/data file: tokens scored (None: all)


def demo_perplexities(folder: Path) -> dict[str, float]:
    """Perplexity of a demo model folder on each held-out text, float32, windows of 256."""
    from qwen3next.evaluate import evaluate

    engine = qwen3next.load(folder, dtype="float32", quiet=True)
    return {name: evaluate(engine, (Path(__file__).parent / "data" / name).read_text(encoding="utf-8"),
                           window=256, max_tokens=tokens).perplexity for name, tokens in DEMO_TEXTS.items()}


@pytest.fixture(scope="module")
def demo_source_perplexities():
    from qwen3next.model_path import DEMO_MODEL

    return demo_perplexities(DEMO_MODEL)


@pytest.mark.slow
@pytest.mark.parametrize("bits, lm_head_bits, bound", [
    (8, None, 0.005),  # the 8-bit target; measured -0.00% / +0.13%
    (4, None, 0.005),  # measured +0.08% / +0.21%; lm_head at 4 bits (+0.92% on modern text) would fail it
    (4, 4, 0.03),  # the speed trade docs/quantization.md offers, within the 4-bit target of 3%
])
def test_demo_model_quantized_keeps_its_perplexity(demo_source_perplexities, tmp_path, bits, lm_head_bits, bound):
    """The trained demo model through `qwen3next quantize`: perplexity change on in-domain and modern held-out text."""
    from qwen3next.model_path import DEMO_MODEL

    policy = Policy(bits, bits_for=[("lm_head.weight", lm_head_bits)] if lm_head_bits else ())
    quantize_checkpoint(DEMO_MODEL, tmp_path / "demo", policy, progress=False)
    quantized = demo_perplexities(tmp_path / "demo")
    change = {name: quantized[name] / demo_source_perplexities[name] - 1 for name in DEMO_TEXTS}
    assert all(abs(c) < bound for c in change.values()), change


def test_run_and_inspect_work_on_a_quantized_folder(quantized, capsys):
    code, out, err = cli(["run", "-m", quantized[4], "-p", "Hello", "-n", "4", "-t", "0", "-q"], capsys)
    assert code == 0 and out.endswith("\n"), err
    code, out, err = cli(["inspect", quantized[4], "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["quantization"]


def test_tied_embeddings_quantized(models, tmp_path):
    out = tmp_path / "tied8"
    quantize_checkpoint(models("tied"), out, Policy(8), progress=False)
    reference = qwen3next.load(models("tied"), dtype="float32")
    fake_quantize_(reference.model, reference.expert_store, Policy(8).bits)
    ids = list(range(3, 30))
    torch.testing.assert_close(qwen3next.load(out, dtype="float32").logits(ids), reference.logits(ids),
                               rtol=0, atol=1e-5)


def test_overrides_reach_the_file(models, tmp_path):
    out = tmp_path / "mixed"
    policy = Policy(8, keep=["lm_head.weight"], bits_for=[("*.self_attn.*", 4), ("model.layers.1.mlp.experts.*", 4)])
    quantize_checkpoint(models("tiny"), out, policy, progress=False)
    with CheckpointReader(out) as reader:
        assert reader.dtype("lm_head.weight") == torch.float32  # kept as stored
        assert "model.layers.3.self_attn.q_proj.weight.q4" in reader
        assert "model.layers.0.linear_attn.out_proj.weight.q8" in reader
    experts = json.loads((out / "config.json").read_text())["quantization"]["experts"]
    assert experts["model.layers.1"]["down_proj"]["bits"] == 4 and experts["model.layers.0"]["down_proj"]["bits"] == 8
    assert qwen3next.load(out).logits([5, 6, 7]).isfinite().all()


# ---- resume, atomic output, bounded memory ----

def _staged_shards(staging: Path) -> list[Path]:
    return [p for p in staging.glob("*.safetensors")] if staging.is_dir() else []


@pytest.mark.slow
def test_killed_run_resumes_to_identical_bytes(tmp_path):
    src = write_model(tmp_path / "src", size="small", seed=7, max_shard_bytes=400_000, num_experts=32)
    reference = tmp_path / "reference"
    quantize_checkpoint(src, reference, Policy(4), progress=False)

    out = tmp_path / "out"
    staging = tmp_path / ".out.partial"
    command = [sys.executable, "-m", "qwen3next", "quantize", str(src), str(out), "-q"]
    for attempt in range(5):  # kill -9 once at least one shard is done and before the last
        process = subprocess.Popen(command, stderr=subprocess.PIPE)
        while process.poll() is None and not _staged_shards(staging):
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if not out.exists():
            break
        shutil.rmtree(out)
    assert not out.exists() and _staged_shards(staging), "the run was not caught mid-way"
    finished = len(_staged_shards(staging))
    done = subprocess.run(command[:-1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming: {finished} of" in done.stderr
    assert not staging.exists()
    names = sorted(p.name for p in reference.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


@pytest.mark.slow
def test_peak_memory_is_bounded_by_the_chunk_not_the_model(tmp_path):
    """A ~290 MB fp32 checkpoint with two 134 MB matrices converts within 8 chunks (128 MB) of its import baseline."""
    src = write_model(tmp_path / "big", size="small", seed=3, vocab_size=262144, max_shard_bytes=100 * 2**20)
    probe = ("import resource, sys, torch; from qwen3next.quant.convert import quantize_checkpoint, CHUNK_BYTES; "
             "from qwen3next.quant.policy import Policy; {}; "
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, CHUNK_BYTES)")
    baseline = subprocess.run([sys.executable, "-c", probe.format("pass")], capture_output=True, text=True)
    convert = "quantize_checkpoint(sys.argv[1], sys.argv[2], Policy(4), progress=False)"
    done = subprocess.run([sys.executable, "-c", probe.format(convert), str(src), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    base_rss = int(baseline.stdout.split()[0])
    peak_rss, chunk = map(int, done.stdout.split())
    model_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    assert model_bytes > 250 * 2**20
    assert peak_rss - base_rss < 8 * chunk, (peak_rss - base_rss) / 2**20


# ---- bad inputs: one line, the right exit code, nothing half-written that looks complete ----

def test_bad_bits_and_patterns_are_usage_errors(models, tmp_path, capsys):
    src = models("tiny")
    for args, expected in (
        (["--bits", "3"], "--bits"),
        (["--group-size", "48"], "--group-size"),
        (["--bits-for", "*.self_attn.*"], "--bits-for"),
        (["--bits-for", "*.self_attn.*=2"], "bits must be 4 or 8"),
        (["--keep", "no.such.*"], "matches no tensor"),
        (["--keep", "*.experts.*"], "routed experts are always quantized"),
        (["--bits-for", "*.experts.3.*=8"], "all experts of a layer alike"),
    ):
        code, out, err = cli(["quantize", src, tmp_path / "out", *args], capsys)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not (tmp_path / "out").exists()


def test_bad_sources(models, model_copy, tmp_path, capsys):
    code, _, err = cli(["quantize", tmp_path / "missing", tmp_path / "o"], capsys)
    assert code == 2 and "SRC not found" in err
    other = model_copy("tiny")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    code, _, err = cli(["quantize", other, tmp_path / "o"], capsys)
    assert code == 1 and "model_type" in err
    code, _, err = cli(["quantize", models("tiny"), models("tiny") / "inside"], capsys)
    assert code == 2 and "OUT is inside SRC" in err and not (models("tiny") / "inside").exists()


def test_a_hub_id_in_the_local_cache_as_source(models, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--org--tiny"
    shutil.copytree(models("tiny"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(["quantize", "org/tiny", tmp_path / "q8", "--bits", "8", "-q"], capsys)
    assert code == 0, err
    assert (tmp_path / "q8" / "tokenizer.json").read_bytes() == (models("tiny") / "tokenizer.json").read_bytes()
    code, _, err = cli(["quantize", "org/absent", tmp_path / "q9"], capsys)
    assert code == 1 and "not in the local Hugging Face cache" in err


def test_already_quantized_source_is_refused(quantized, tmp_path, capsys):
    code, _, err = cli(["quantize", quantized[4], tmp_path / "again"], capsys)
    assert code == 2 and "already quantized" in err


@pytest.mark.parametrize("damage, message", [("truncate", "truncated"), ("garble", "header is not valid JSON")])
def test_truncated_or_corrupt_source_shard(model_copy, tmp_path, capsys, damage, message):
    src = model_copy("tiny")
    shard = sorted(src.glob("model-*.safetensors"))[1]
    if damage == "truncate":
        os.truncate(shard, shard.stat().st_size - 100)
    else:
        with open(shard, "r+b") as f:
            f.seek(8)
            f.write(b"\xff" * 16)
    code, _, err = cli(["quantize", src, tmp_path / "o"], capsys)
    assert code == 1 and shard.name in err and message in err
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def test_non_finite_weight_is_reported_by_name(model_copy, tmp_path, capsys):
    src = model_copy("tiny")
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    with CheckpointReader(src) as reader:
        path, offset, _ = reader.byte_range(name)
        assert reader.dtype(name) == torch.float32
    with open(path, "r+b") as f:
        f.seek(offset + 4 * 7)
        f.write(struct.pack("<f", float("nan")))
    code, _, err = cli(["quantize", src, tmp_path / "o"], capsys)
    assert code == 1 and name in err and "NaN" in err
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(models, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = cli(["quantize", models("tiny"), out], capsys)
    assert code == 2 and "--force" in err and (out / "precious.txt").exists()
    code, stdout, err = cli(["quantize", models("tiny"), out, "--force", "-q"], capsys)
    assert code == 0 and stdout.strip() == str(out) and not (out / "precious.txt").exists()
    assert (out / "config.json").exists()


def test_disk_full_midway_leaves_nothing_complete_and_resumes(models, tmp_path, monkeypatch, capsys):
    real_pwrite, calls = os.pwrite, []

    def failing_pwrite(fd, data, offset):
        calls.append(1)
        if len(calls) == 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    out = tmp_path / "o"
    monkeypatch.setattr(os, "pwrite", failing_pwrite)
    code, _, err = cli(["quantize", models("tiny"), out, "-q"], capsys)
    assert code == 1 and "disk full" in err and "resume" in err
    staging = tmp_path / ".o.partial"
    assert not out.exists() and not list(staging.glob(".*.tmp"))  # the interrupted shard is gone
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    code, stdout, err = cli(["quantize", models("tiny"), out], capsys)
    assert code == 0 and "resuming" in err
    reference = tmp_path / "reference"
    quantize_checkpoint(models("tiny"), reference, Policy(4), progress=False)
    for path in reference.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes()


def test_verify_reports_tensor_errors_and_logit_agreement(models, tmp_path, capsys):
    code, _, err = cli(["quantize", models("tiny"), tmp_path / "o", "--bits", "8", "--verify", "-q"], capsys)
    assert code == 0, err
    assert "8-bit matrices" in err and "relative RMS error" in err
    assert "KL(source || quantized)" in err and "top-1 agreement" in err
