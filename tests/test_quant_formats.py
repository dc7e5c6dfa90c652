"""Round-trip error bounds of the quantized weight formats."""

from __future__ import annotations

import pytest
import torch

from qwen3next import cpu_kernels as kernels
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


def test_group_size_shrinks_to_fit_narrow_rows():
    assert int4.group_for(2048, 64) == 64 and int4.group_for(56, 64) == 56 and int4.group_for(96, 64) == 48


def test_int4_refuses_a_ragged_group():
    with pytest.raises(ValueError, match="multiple of the group size"):
        int4.quantize(weights(4, 100), 64)


@pytest.mark.parametrize("rows, group", [(1, 64), (4, 64), (1, 8)])  # group 8: the kernel's portable loop
def test_cpu_kernels_multiply_by_the_dequantized_weights(rows, group):
    status = kernels.prepare()  # here, not at collection: a build takes seconds
    if status.isa is None:
        pytest.skip(f"kernels not loaded: {status.describe()}")
    w = weights(40, 256, seed=3)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(4)).bfloat16()
    q, scale = int8.quantize(w)
    packed, scale4, minimum = int4.quantize(w, group)
    with torch.inference_mode():
        # bounds: bf16 output rounding (2^-8) plus the kernels' activation codes: int16 for 8-bit weights
        # (negligible), int8 for 4-bit weights (a step of 1/127 of each 64-block's largest value, small
        # against the weights' own 4-bit error; decode KL on the demo model is that of bf16 rounding)
        for got, dense, bound in [
            (kernels.linear_q8(x, q, scale), int8.dequantize(q, scale, torch.float32), 2**-7),
            (kernels.linear_q4(x, packed, scale4, minimum), int4.dequantize(packed, scale4, minimum, torch.float32),
             2**-6),
        ]:
            expected = x.float() @ dense.T
            assert ((got.float() - expected).abs().max() / expected.abs().max()).item() < bound


def test_default_policy():
    from qwen3next.quant.policy import default_bits

    assert default_bits("model.layers.3.mlp.experts.17.down_proj.weight", 4) == 4
    assert default_bits("mtp.layers.0.mlp.experts.0.gate_proj.weight", 4) == 4
    for kept in ("model.layers.0.mlp.gate.weight", "model.layers.0.mlp.shared_expert_gate.weight",
                 "model.layers.0.input_layernorm.weight", "model.layers.0.linear_attn.conv1d.weight",
                 "model.layers.0.linear_attn.A_log", "model.layers.0.linear_attn.dt_bias",
                 "model.layers.0.linear_attn.norm.weight", "model.norm.weight", "mtp.pre_fc_norm_hidden.weight"):
        assert default_bits(kept, 4) is None, kept
    for eight in ("lm_head.weight", "model.layers.0.linear_attn.in_proj_qkvz.weight",
                  "model.layers.3.self_attn.q_proj.weight", "model.layers.0.mlp.shared_expert.down_proj.weight",
                  "model.embed_tokens.weight", "mtp.fc.weight"):
        assert default_bits(eight, 4) == default_bits(eight, 8) == 8, eight


@pytest.mark.slow
def test_fake_quantization_moves_logits_a_little(models):
    """Each figure from the checkpoint's own weights: 4 bits must cost more than 8, and neither much."""
    import qwen3next
    from qwen3next.quant.policy import default_bits
    from qwen3next.quant.simulate import fake_quantize_

    ids = list(range(5, 105))
    exact = qwen3next.load(models("small"), dtype="float32").logits(ids)

    def error(bits: int) -> float:
        engine = qwen3next.load(models("small"), dtype="float32")
        fake_quantize_(engine.model, engine.expert_store, lambda name: default_bits(name, bits))
        return ((engine.logits(ids) - exact).abs().mean() / exact.abs().mean()).item()

    assert 0 < error(8) < error(4) < 0.5


@pytest.mark.parametrize("bits, group", [(8, 0), (4, 64), (4, 8)])
def test_a_quantized_embedding_lookup_has_the_dequantized_tables_bits(bits, group):
    """The C lookup (one call a decode step) returns the rows of the dequantized table exactly, and names an
    id outside the table rather than reading past it."""
    from qwen3next.quant.modules import QuantizedEmbedding, dequantize

    status = kernels.prepare()
    if status.isa is None:
        pytest.skip(f"kernels not loaded: {status.describe()}")
    w = weights(300, 128, seed=5) * torch.linspace(0.1, 30, 128)  # magnitudes where bf16 rounding matters
    arrays = list(int8.quantize(w)) if bits == 8 else list(int4.quantize(w, group))
    table = QuantizedEmbedding(bits, arrays, torch.bfloat16)
    ids = torch.tensor([[0, 299, 17], [17, 5, 123]])
    assert torch.equal(table(ids), dequantize(bits, arrays, torch.bfloat16)[ids])
    with pytest.raises(IndexError, match="token id 300"):
        table(torch.tensor([[3, 300]]))
