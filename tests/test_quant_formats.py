"""Round-trip error bounds of the quantized weight formats."""

from __future__ import annotations

import pytest
import torch

from qwen3next.quant import int4, int8


def weights(out_features=48, in_features=256, seed=0):
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05


def relative_rms(approx, exact):
    return ((approx.float() - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt()).item()


def test_int8_error_is_at_most_half_a_step():
    w = weights()
    q, scale = int8.quantize(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    error = (int8.dequantize(q, scale, torch.float32) - w).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()
    assert relative_rms(int8.dequantize(q, scale, torch.float32), w) < 0.01


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step(group):
    w = weights()
    packed, scale, minimum = int4.quantize(w, group)
    assert packed.shape == (48, 128) and packed.dtype == torch.uint8 and scale.shape == (48, 256 // group)
    back = int4.dequantize(packed, scale, minimum, torch.float32)
    step = scale.float().repeat_interleave(group, dim=1)
    assert ((back - w).abs() <= step / 2 + 1e-6).all()
    assert relative_rms(back, w) < 0.12


def test_int4_keeps_extremes_and_constant_groups():
    w = weights(4, 64)
    w[0] = 0.25  # a constant row: one group, no range
    packed, scale, minimum = int4.quantize(w, 64)
    back = int4.dequantize(packed, scale, minimum, torch.float32)
    assert torch.allclose(back[0], w[0], atol=1e-3)
    assert torch.allclose(back.amax(1), w.amax(1), atol=2e-3) and torch.allclose(back.amin(1), w.amin(1), atol=2e-3)


def test_int4_nibble_order_is_low_then_high():
    w = torch.tensor([[0.0, 15.0] * 32])  # codes 0 and 15 alternate with scale 1, minimum 0
    packed, scale, minimum = int4.quantize(w, 64)
    assert scale.item() == 1.0 and minimum.item() == 0.0
    assert (packed == 0xF0).all()


def test_int4_refuses_a_ragged_group():
    with pytest.raises(ValueError, match="multiple of the group size"):
        int4.quantize(weights(4, 100), 64)


kernels = pytest.importorskip("qwen3next.cpu_kernels")


@pytest.mark.skipif(kernels.library() is None, reason="no C compiler: kernels not built")
@pytest.mark.parametrize("rows", [1, 4])
def test_cpu_kernels_multiply_by_the_dequantized_weights(rows):
    w = weights(40, 256, seed=3)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(4)).bfloat16()
    q, scale = int8.quantize(w)
    packed, scale4, minimum = int4.quantize(w, 64)
    with torch.inference_mode():
        for got, dense in [
            (kernels.linear_q8(x, q, scale), int8.dequantize(q, scale, torch.float32)),
            (kernels.linear_q4(x, packed, scale4, minimum), int4.dequantize(packed, scale4, minimum, torch.float32)),
        ]:
            expected = x.float() @ dense.T
            assert ((got.float() - expected).abs().max() / expected.abs().max()).item() < 2**-7
