"""The demo model shipped in the package: it loads by default, and still scores what it scored when trained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import qwen3next
from qwen3next.evaluate import evaluate
from qwen3next.model_path import DEMO_MODEL

HELDOUT = Path(__file__).parent / "data" / "heldout.txt"
RECORD = json.loads((DEMO_MODEL / "demo.json").read_text())


@pytest.fixture(scope="module")
def engine():
    return qwen3next.load(dtype="float32", device="cpu", quiet=True)


@pytest.fixture(scope="module")
def heldout(engine):
    figures = RECORD["heldout"]
    return evaluate(engine, HELDOUT.read_text(encoding="utf-8"), window=figures["window"], max_tokens=figures["tokens"])


def test_demo_model_has_every_qwen3_next_feature(engine):
    config = engine.config
    assert config.layer_types.count("full_attention") * 3 == config.layer_types.count("linear_attention")
    assert config.num_hidden_layers >= 8 and config.num_experts >= 32 and config.num_experts_per_tok >= 4
    assert config.shared_expert_intermediate_size > 0 and config.partial_rotary_factor < 1
    assert engine.model.mtp is not None and engine.tokenizer.has_chat_template
    assert sum(f.stat().st_size for f in DEMO_MODEL.iterdir()) < 45 * 2**20


@pytest.mark.slow
def test_heldout_perplexity_matches_the_record(heldout):
    recorded = RECORD["heldout"]["perplexity"]
    assert abs(heldout.perplexity - recorded) / recorded < 0.02
    assert heldout.perplexity < 150  # it learned English: a uniform guess over 6144 ids scores 6144


def test_greedy_continuation_is_stable(engine):
    greedy = RECORD["greedy"]
    tokens = list(engine.generate(greedy["prompt"], max_new_tokens=len(greedy["tokens"]), temperature=0))
    assert [t.token for t in tokens] == greedy["tokens"]


@pytest.mark.slow
def test_mtp_head_beats_a_unigram_baseline(heldout):
    assert heldout.mtp_accuracy > 1.5 * heldout.unigram_accuracy


@pytest.mark.slow
def test_routing_is_balanced_overall_yet_not_uniform(heldout):
    for layer in heldout.routing:
        assert layer.experts_for_90_percent > 0.5  # no layer collapsed onto a few experts
        assert layer.busiest_to_mean_load < 4


@pytest.mark.slow
def test_cli_uses_the_demo_model_by_default_and_says_so():
    done = subprocess.run([sys.executable, "-m", "qwen3next", "run", "-p", "It is a truth", "-n", "8", "-t", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "demo model" in done.stderr and "qwen3next download" in done.stderr
    assert done.stdout.strip()
