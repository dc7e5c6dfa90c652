"""Router statistics: the routing observer on every MoE path, the counts, their file, and the model identity."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import qwen3next
from qwen3next import cpu_kernels
from qwen3next.errors import ConfigError, UsageError
from qwen3next.moe import SparseMoE, set_routing_observer
from qwen3next.offload import router_stats
from qwen3next.offload.router_report import format_table, plot_heatmap
from qwen3next.offload.router_stats import RouterStatistics, model_identity

IDENTITY = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache folder of the test's own (the CPU kernels prepared first, from the usual cache)."""
    cpu_kernels.prepare(quiet=True)
    monkeypatch.setenv("QWEN3NEXT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def engine(models):
    return qwen3next.load(models("tiny"), dtype="bfloat16", device="cpu", quiet=True)


def _stats(path: Path | None = None, layers: int = 3, experts: int = 4, top_k: int = 2, main_layers: int = 2):
    return RouterStatistics(layers, experts, top_k, main_layers, IDENTITY, path)


# --- the observer ----------------------------------------------------------------------------------


class Recorder:
    """Checks each report against the block's own record of the routing and keeps what it saw."""

    def __init__(self, model):
        self.blocks = {m.layer: m for m in model.modules() if isinstance(m, SparseMoE)}
        self.seen: list[tuple[int, int, torch.dtype]] = []  # (layer, tokens, routing weights' dtype)
        self.waiting: dict[int, int] = {}

    def before_routing(self, layer: int, x: torch.Tensor) -> None:
        assert x.dim() == 2 and x.shape[1] == self.blocks[layer].gate.in_features
        self.waiting[layer] = x.shape[0]

    def routed(self, layer: int, ids: torch.Tensor) -> None:
        routing = self.blocks[layer].last_routing
        assert ids is routing.ids and ids.dtype == torch.int64 and self.waiting.pop(layer) == ids.shape[0]
        self.seen.append((layer, ids.shape[0], routing.weights.dtype))


@pytest.mark.slow
def test_observer_sees_the_fused_decode_kernel_and_the_torch_path(engine):
    if cpu_kernels.library() is None:
        pytest.skip(f"no CPU kernels: {cpu_kernels.prepare(quiet=True).describe()}")
    plain = [t.token for t in engine.generate("Hello there, how", max_new_tokens=8, temperature=0)]
    recorder = Recorder(engine.model)
    set_routing_observer(engine.model, recorder)
    try:
        observed = [t.token for t in engine.generate("Hello there, how", max_new_tokens=8, temperature=0)]
    finally:
        set_routing_observer(engine.model, None)
    assert observed == plain  # observing changes nothing
    main = engine.config.num_hidden_layers
    assert engine.model.mtp.layers[0].mlp.layer == main and main in recorder.blocks  # the MTP block got it too
    prompt = len(engine.tokenizer.encode("Hello there, how"))
    # prefill (one call of `prompt` tokens, torch path: weights in the model dtype), then a one-token
    # step through the fused kernel (which reports fp32 weights) per token but the last, each through
    # every main layer in order
    expected = [(layer, prompt, torch.bfloat16) for layer in range(main)]
    expected += [(layer, 1, torch.float32) for _ in range(len(observed) - 1) for layer in range(main)]
    assert len(observed) > 1
    assert recorder.seen == expected
    assert all(m.observer is None for m in recorder.blocks.values())


@pytest.mark.slow
def test_statistics_of_a_generation_add_up(engine, cache):
    stats = RouterStatistics.for_model(engine.folder, engine.config)
    plain = [t.token for t in engine.generate("Once upon", max_new_tokens=6, temperature=0)]
    set_routing_observer(engine.model, stats)
    try:
        stats.start_sequence()
        observed = [t.token for t in engine.generate("Once upon", max_new_tokens=6, temperature=0)]
    finally:
        set_routing_observer(engine.model, None)
    assert observed == plain
    main, k = engine.config.num_hidden_layers, engine.config.num_experts_per_tok
    tokens = len(engine.tokenizer.encode("Once upon")) + len(observed) - 1  # the last one is never fed back
    assert stats.tokens.tolist() == [tokens] * main + [0]  # the MTP layer does not run while generating
    assert stats.counts.sum(1).tolist() == [tokens * k] * main + [0]
    assert stats.transitions.tolist() == [tokens - 1] * main + [0]
    assert stats.coactivation.sum((1, 2)).tolist() == [tokens * k * k] * (main - 1)
    assert (stats.reuse <= stats.counts).all()


# --- counting ----------------------------------------------------------------------------------------


def test_counts_on_a_hand_made_routing():
    stats = _stats()
    stats.routed(0, torch.tensor([[0, 1], [1, 2], [2, 3]]))  # a prefill chunk of 3 tokens
    stats.routed(1, torch.tensor([[3, 0], [0, 1], [1, 2]]))
    stats.routed(0, torch.tensor([[1, 3]]))  # one decode step
    stats.routed(1, torch.tensor([[2, 0]]))
    stats.routed(2, torch.tensor([[3, 2]]))  # the MTP layer: counted, never paired with layer 1
    assert stats.counts.tolist() == [[1, 3, 2, 2], [3, 2, 2, 1], [0, 0, 1, 1]]
    assert stats.tokens.tolist() == [4, 4, 1] and stats.transitions.tolist() == [3, 3, 0]
    # layer 0: {0,1} {1,2} {2,3} {1,3} reuses 1, then 2, then 3; layer 1: {3,0} {0,1} {1,2} {2,0}: 0, 1, 2
    assert stats.reuse.tolist() == [[0, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]]
    assert stats.coactivation.tolist() == [[[1, 0, 0, 1], [3, 1, 1, 1], [1, 2, 1, 0], [1, 1, 2, 0]]]


def _reference(sequences, layers, experts, main_layers):
    """The counts by the definitions, one token at a time."""
    counts, reuse = torch.zeros(layers, experts, dtype=torch.int64), torch.zeros(layers, experts, dtype=torch.int64)
    coactivation = torch.zeros(main_layers - 1, experts, experts, dtype=torch.int64)
    tokens, transitions = torch.zeros(layers, dtype=torch.int64), torch.zeros(layers, dtype=torch.int64)
    for routes in sequences:  # routes[layer]: [T, k]
        for layer, rows in enumerate(routes):
            for t, row in enumerate(rows.tolist()):
                tokens[layer] += 1
                for e in row:
                    counts[layer, e] += 1
                    if t > 0 and e in rows[t - 1].tolist():
                        reuse[layer, e] += 1
                transitions[layer] += t > 0
                if layer + 1 < main_layers:
                    for a in row:
                        for b in routes[layer + 1][t].tolist():
                            coactivation[layer, a, b] += 1
    return dict(counts=counts, coactivation=coactivation, reuse=reuse, tokens=tokens, transitions=transitions)


@pytest.mark.parametrize("fold_every", [1, 3, 7, 4096])
def test_counts_match_the_definitions_however_tokens_are_chunked_and_folded(fold_every):
    rng = random.Random(fold_every)
    layers, experts, k, main = 4, 6, 3, 3
    sequences = [[torch.stack([torch.randperm(experts)[:k] for _ in range(length)]) for _ in range(layers)]
                 for length in (9, 1, 5)]
    stats = RouterStatistics(layers, experts, k, main)
    stats.fold_every = fold_every
    for routes in sequences:
        stats.start_sequence()
        start = 0
        while start < len(routes[0]):  # a random mix of prefill chunks and one-token steps
            stop = min(len(routes[0]), start + rng.choice([1, 1, 2, 4]))
            for layer in range(main):
                stats.routed(layer, routes[layer][start:stop])
            start = stop
        stats.routed(main, routes[main])  # the MTP layer in a pass of its own
    expected = _reference(sequences, layers, experts, main)
    for name, tensor in expected.items():
        assert torch.equal(stats.total(name), tensor), name


def test_predictions_work_without_statistics_and_follow_them():
    stats = _stats()
    assert stats.hottest(0, 3) == [] and stats.predict_next_layer(0, [1], 2) == []
    stats.routed(0, torch.tensor([[0, 1], [0, 1], [2, 3]]))
    stats.routed(1, torch.tensor([[2, 3], [3, 2], [1, 0]]))
    assert stats.hottest(0, 3) == []  # predictions read folded counts only (no fold per call)
    stats.fold()
    assert stats.hottest(0, 3) == [0, 1, 2]  # ties go to the lower id
    assert stats.hottest(1, 10) == [2, 3, 0, 1]
    assert stats.predict_next_layer(0, [0], 2) == [2, 3]
    assert stats.predict_next_layer(0, torch.tensor([2]), 3) == [0, 1, 2]  # co-activation first, then popularity
    assert stats.predict_next_layer(1, [0], 2) == []  # the MTP layer after it never ran
    with pytest.raises(IndexError):
        stats.predict_next_layer(3, [0], 1)


# --- the file ----------------------------------------------------------------------------------------


def test_save_merges_into_the_file_and_resets_what_is_unsaved(tmp_path, capsys):
    path = tmp_path / "stats.safetensors"
    first, second = _stats(path), _stats(path)
    first.routed(0, torch.tensor([[0, 1]]))
    assert first.save() and not first.save()  # nothing new to save the second time
    second.load()
    assert second.counts.tolist() == first.counts.tolist()
    second.routed(0, torch.tensor([[1, 2]]))
    first.routed(0, torch.tensor([[3, 2]]))
    assert second.save() and first.save()
    assert first.counts[0].tolist() == [1, 2, 2, 1] and first.tokens[0] == 3
    assert not first.maybe_save(every_seconds=3600)
    first.routed(1, torch.tensor([[0, 0]]))
    assert first.maybe_save(every_seconds=0)
    third = _stats(path)
    third.load()
    assert third.counts.tolist() == first.counts.tolist() and third.transitions[0] == 1  # [0, 1] -> [3, 2]
    assert capsys.readouterr().err == ""


_WRITER = """
import sys, time, torch
sys.modules["numpy"] = None  # a plain install has no numpy
from pathlib import Path
from qwen3next.offload.router_stats import RouterStatistics
path, me, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
stats = RouterStatistics(3, 4, 2, 2, "%s", path)
(path.parent / f"ready{me}").touch()
for _ in range(rounds):
    stats.routed(0, torch.tensor([[me, 3]]))
    stats.routed(1, torch.tensor([[2, me]]))
    assert stats.save()
""" % IDENTITY


@pytest.mark.slow  # two interpreters importing torch
def test_concurrent_writers_both_count(tmp_path):
    path, rounds = tmp_path / "stats.safetensors", 15
    with router_stats._exclusive(tmp_path / "stats.safetensors.lock"):  # both wait for this lock
        writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(me), str(rounds)],
                                    stderr=subprocess.PIPE, text=True) for me in (0, 1)]
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready{me}").exists() for me in (0, 1)) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        assert not path.exists()  # the lock held them back
    for writer in writers:
        assert writer.wait(timeout=120) == 0, writer.stderr.read()[-2000:]
    stats = _stats(path)
    stats.load()
    assert stats.tokens.tolist() == [2 * rounds, 2 * rounds, 0]
    assert stats.counts[0].tolist() == [rounds, rounds, 0, 2 * rounds]
    assert stats.coactivation[0, 3, 2] == 2 * rounds and stats.coactivation[0, 0, 0] == rounds


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "shapes":  # the same identity, counts for 5 experts
        path.unlink()
        other = _stats(path, experts=5)
        other.routed(0, torch.tensor([[0, 1]]))
        assert other.save()
        return
    path.write_bytes({"garbage": b"\x00\x13 not statistics at all", "truncated": data[:-20], "empty": b"",
                      "identity": data.replace(IDENTITY.encode(), b"f" * 32),
                      "version": data.replace(b'"format_version":"1"', b'"format_version":"0"'),
                      "negative": data[:-8] + (-1).to_bytes(8, "little", signed=True)}[how])


@pytest.mark.parametrize("how, says", [("garbage", "truncated or not a safetensors file"),
                                       ("truncated", "truncated"), ("empty", "truncated"),
                                       ("identity", "statistics of another model"), ("shapes", "expected 3 layers"),
                                       ("version", "format version '0'"), ("negative", "negative counts")])
def test_an_unusable_file_warns_once_and_is_replaced(tmp_path, capsys, how, says):
    path = tmp_path / "stats.safetensors"
    good = _stats(path)
    good.routed(0, torch.tensor([[2, 3]]))
    good.save()
    _damage(path, how)
    capsys.readouterr()
    stats = _stats(path)
    stats.load()
    assert not stats.counts.any()
    stats.routed(0, torch.tensor([[0, 1]]))
    assert stats.save()  # reads the bad file again: still one warning
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"qwen3next: warning: router statistics {path}: ")
    assert says in err[0] and err[0].endswith("; starting fresh")
    again = _stats(path)
    again.load()
    assert again.counts[0].tolist() == [1, 1, 0, 0] and capsys.readouterr().err == ""


def test_an_unwritable_cache_runs_without_saving(models, tmp_path, monkeypatch, capsys):
    cpu_kernels.prepare(quiet=True)
    (tmp_path / "file").write_text("a regular file")
    monkeypatch.setenv("QWEN3NEXT_CACHE", str(tmp_path / "file" / "cache"))
    stats = RouterStatistics.for_model(models("tiny"))
    stats.routed(0, torch.tensor([[0, 1]]))
    assert not stats.save() and not stats.save()
    assert stats.counts[0, :2].tolist() == [1, 1]  # still counted in memory
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"qwen3next: warning: router statistics {tmp_path / 'file'}")
    assert "cannot save (Not a directory); running without saving them" in err[0]


def test_statistics_live_in_the_user_cache_by_model_identity(models, cache):
    stats = RouterStatistics.for_model(models("tiny"))
    stats.routed(0, torch.tensor([[0, 1]]))
    assert stats.save()
    assert stats.path == cache / "router-stats" / f"{model_identity(models('tiny'))}.safetensors"
    assert stats.path.is_file() and sorted(p.name for p in stats.path.parent.iterdir()) == \
        [stats.path.name, stats.path.name + ".lock"]  # no temporary file left behind
    assert RouterStatistics.for_model(models("tiny")).counts[0, :2].tolist() == [1, 1]


# --- identity ----------------------------------------------------------------------------------------


def test_identity_follows_the_model_not_its_folder(models, tmp_path):
    source = models("tiny")
    copy = Path(shutil.copytree(source, tmp_path / "elsewhere"))
    identity = model_identity(source)
    assert len(identity) == 32 and model_identity(copy) == identity
    config = json.loads((copy / "config.json").read_text())
    config["quantization"] = {"format": "qwen3next-q", "bits": 4}  # a section alone changes nothing
    (copy / "config.json").write_text(json.dumps(config))
    assert model_identity(copy) == identity
    config["quantization"]["source_identity"] = "a" * 32  # recorded by the quantizer: taken as it is
    (copy / "config.json").write_text(json.dumps(config))
    assert model_identity(copy) == "a" * 32
    config["quantization"]["source_identity"] = "../../elsewhere"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="source_identity"):
        model_identity(copy)
    del config["quantization"]
    config["rms_norm_eps"] = 1e-5
    (copy / "config.json").write_text(json.dumps(config))
    assert model_identity(copy) != identity


# --- the report --------------------------------------------------------------------------------------


def test_table_names_each_layer_that_routed():
    stats = _stats()
    assert "nothing counted yet" in format_table(stats)
    stats.routed(0, torch.tensor([[0, 1], [0, 1], [0, 2], [0, 3]]))
    stats.routed(2, torch.tensor([[3, 2]]))
    lines = format_table(stats).splitlines()
    assert len(lines) == 4 and lines[2].split()[:6] == ["0", "4", "4", "2.00", "66.7%", "0"]
    assert lines[2].endswith("0 (50.0%), 1 (25.0%), 2 (12.5%), 3 (12.5%)")
    assert lines[3].split()[:5] == ["mtp0", "1", "2", "2.00", "-"]


def test_heatmap(tmp_path):
    pytest.importorskip("matplotlib")
    stats = _stats()
    stats.routed(0, torch.tensor([[0, 1], [0, 2]]))
    plot_heatmap(stats, tmp_path / "heat.png")
    assert (tmp_path / "heat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heatmap_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if it were not installed
    with pytest.raises(UsageError, match=r'--plot needs matplotlib: pip install "qwen3next\[plot\]"'):
        plot_heatmap(_stats(), tmp_path / "heat.png")
    assert not (tmp_path / "heat.png").exists()
