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


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_folder_runs_on_cuda_as_on_the_cpu(models, tmp_path, bits):
    """One quantized folder serves both devices: on CUDA the matrices and experts dequantize per call."""
    from qwen3next.quant.convert import quantize_checkpoint
    from qwen3next.quant.policy import Policy

    folder = tmp_path / f"q{bits}"
    quantize_checkpoint(models("small"), folder, Policy(bits), progress=False)
    ids = list(range(3, 200))
    cpu = qwen3next.load(folder, dtype="float32", device="cpu").logits(ids)
    engine = qwen3next.load(folder, dtype="float32", device="cuda")
    assert engine.expert_store.blobs[0].device.type == "cuda"
    gpu = engine.logits(ids).cpu()
    assert ((gpu - cpu).abs().max() / cpu.abs().max()).item() < 1e-3
    tokens = list(qwen3next.load(folder, device="cuda").generate("Hello there", max_new_tokens=8, temperature=0))
    assert len(tokens) == 8
