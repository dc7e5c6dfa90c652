"""The same model on a CUDA device: logits agree with the CPU, generation runs. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

import qwen3next

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_logits_match_cpu(models):
    folder = models("small")
    ids = list(range(3, 200))
    cpu = qwen3next.load(folder, dtype="float32", device="cpu").logits(ids)
    gpu = qwen3next.load(folder, dtype="float32", device="cuda").logits(ids).cpu()
    assert ((gpu - cpu).abs().max() / cpu.abs().max()).item() < 1e-3


def test_cuda_generation_in_bf16(models):
    engine = qwen3next.load(models("small"), dtype="bfloat16", device="cuda")
    tokens = list(engine.generate("Hello there", max_new_tokens=16, temperature=0))
    assert len(tokens) == 16 and engine.device.type == "cuda"
