"""Logits come out in fp32 on every path, so bf16 rounding (a step of 0.0625 at 8-16) never ties close candidates."""

from __future__ import annotations

import pytest
import torch

import qwen3next
from qwen3next import cpu_kernels

PROMPT = "It is a truth universally acknowledged, that"
SHOULD_OR_HAVE = PROMPT + "\nI am sure I"  # fp32: ' should' 8.64 vs ' have' 8.60: 8.625 both, in bf16


@pytest.fixture(scope="module")
def demo():
    return {dtype: qwen3next.load(dtype=dtype, quiet=True) for dtype in ("bfloat16", "float32")}


def greedy(engine) -> str:
    return "".join(token.text for token in engine.generate(PROMPT, max_new_tokens=12, temperature=0))


def test_bf16_greedy_continuation_is_the_fp32_one(demo):
    text = greedy(demo["bfloat16"])
    assert "I should not have been" in text  # with bf16 logits: "I have not been" (the tie goes to ' have')
    assert text == greedy(demo["float32"])


def decode_logits(engine, text: str) -> torch.Tensor:
    """The next-token logits after `text`, as generation computes them: prefill the prompt, decode the rest."""
    ids, start = engine.tokenizer.encode(text), len(engine.tokenizer.encode(PROMPT))
    model, cache = engine.model, engine.model.make_cache()
    with torch.inference_mode():
        logits = model(torch.tensor([ids[:start]]), cache, last_only=True)
        for token in ids[start:]:
            logits = model(torch.tensor([[token]]), cache)
    return logits[0, -1]


@pytest.mark.parametrize("path", ["decode, kernels", "decode, torch", "Engine.logits"])
def test_close_candidates_stay_apart(demo, monkeypatch, path):
    engine = demo["bfloat16"]
    if path == "decode, torch":
        monkeypatch.setattr(cpu_kernels, "_lib", None)
        monkeypatch.setattr(cpu_kernels, "_loaded", True)
    if path == "Engine.logits":  # prefill-sized: the torch fp32 fallback even where kernels are built
        logits = engine.logits(engine.tokenizer.encode(SHOULD_OR_HAVE))[-1]
    else:
        logits = decode_logits(engine, SHOULD_OR_HAVE)
    should, have = (logits[engine.tokenizer.encode(word)[0]] for word in (" should", " have"))
    assert logits.dtype == torch.float32
    assert should - have < 0.0625  # the premise: within one bf16 step, so bf16 logits can tie them
    assert should - have > 0.01


@pytest.fixture(scope="module")
def quantized(models, tmp_path_factory):
    from qwen3next.quant.convert import quantize_checkpoint
    from qwen3next.quant.policy import Policy

    def get(name: str, bits: int):
        folder = tmp_path_factory.mktemp(f"{name}-q{bits}")
        quantize_checkpoint(models(name), folder, Policy(bits), progress=False)
        return folder

    return get


def bf16_output(head, hidden: torch.Tensor) -> torch.Tensor:
    """The head's product rounded to bf16, as logits were before."""
    if hasattr(head, "project"):  # a tied quantized table
        return head.project(hidden)
    if hasattr(head, "bits"):  # a quantized lm_head
        return head(hidden)
    return torch.nn.functional.linear(hidden, head.weight)  # bf16 lm_head or tied embeddings


@pytest.mark.parametrize("model, bits", [("tiny", None), ("tied", None), ("tiny", 8), ("tiny", 4), ("tied", 8)])
@pytest.mark.parametrize("rows", [1, 20])  # 1: the CPU kernels; 20: the dense torch fallback
def test_logits_are_fp32_on_every_path(models, quantized, model, bits, rows):
    """bf16 lm_head, tied embeddings, 8/4-bit lm_head, tied 8-bit table: fp32 logits that round to the same
    head's bf16 output, carrying bits bf16 has not."""
    folder = models(model) if bits is None else quantized(model, bits)
    lm = qwen3next.load(folder, dtype="bfloat16").model
    head = lm.lm_head if lm.lm_head is not None else lm.model.embed_tokens
    hidden = torch.randn(1, rows, lm.config.hidden_size, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.inference_mode():
        logits, rounded = lm.logits_from_hidden(hidden), bf16_output(head, hidden).float()
    assert logits.dtype == torch.float32 and logits.shape == rounded.shape
    # one bf16 step either way: torch's bf16 GEMM sums in its own order, so it may round the other way
    assert ((logits - rounded).abs() <= 2**-7 * rounded.abs() + 1e-4 * rounded.abs().max()).all()
    assert (logits != logits.bfloat16().float()).float().mean() > 0.9
