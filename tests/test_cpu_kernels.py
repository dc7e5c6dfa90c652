"""The C decode kernels against plain torch math, and the bf16 decode path against the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qwen3next
from qwen3next import cpu_kernels
from qwen3next.cache import DeltaNetState
from qwen3next.deltanet import GatedDeltaNet



@pytest.fixture(autouse=True, scope="module")
def kernels():
    """Built here, not at collection: a build takes seconds and belongs to the tests that need it."""
    status = cpu_kernels.prepare()
    if status.isa is None:
        pytest.skip(f"kernels not loaded: {status.describe()}")

BF16_EPS = 2**-8  # relative spacing of bf16 numbers


def disable_kernels(monkeypatch):
    """Route everything through torch, as on a machine without a compiler."""
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    monkeypatch.setattr(cpu_kernels, "_loaded", True)


def bf16(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).bfloat16()


def assert_bf16_close(actual, expected, slack=4.0):
    """Within a few bf16 roundings of an fp32 result, relative to its magnitude."""
    error = (actual.float() - expected.float()).abs().max().item()
    assert error <= slack * BF16_EPS * expected.float().abs().max().item(), error


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_linear(rows):
    x, w = bf16(rows, 96, seed=1), bf16(40, 96, seed=2)
    with torch.inference_mode():
        assert_bf16_close(cpu_kernels.linear_bf16(x, w), x.float() @ w.float().T)


@pytest.mark.parametrize("slow_bf16_gemm", [False, True])
def test_many_bf16_rows_round_the_fp32_sums_once(monkeypatch, slow_bf16_gemm):
    """Past the kernels' rows, bf16 matmuls take torch's bf16 GEMM or (CPUs without a bf16 GEMM) an fp32 GEMM
    on widened weight blocks: either way each output is the fp32 sum rounded to bf16 once."""
    from qwen3next import layers

    monkeypatch.setattr(layers, "SLOW_CPU_BF16_GEMM", slow_bf16_gemm)
    monkeypatch.setattr(layers, "_WIDEN_BYTES", 40 * 96 * 4 // 3)  # several blocks of weight rows
    x, w = bf16(cpu_kernels.MAX_ROWS + 9, 96, seed=1), bf16(40, 96, seed=2)
    with torch.inference_mode():
        out = layers.linear(x, w)
    assert out.dtype == torch.bfloat16
    assert_bf16_close(out, x.float() @ w.float().T)
    if slow_bf16_gemm:
        assert torch.equal(out, (x.float() @ w.float().T).bfloat16())


def test_linear_fp32_output_is_the_unrounded_sum():
    """fp32_out (logits) returns the fp32 accumulation itself: far inside one bf16 rounding."""
    x, w = bf16(3, 200, seed=1), bf16(70, 200, seed=2)
    exact = x.double() @ w.double().T
    with torch.inference_mode():
        y = cpu_kernels.linear_bf16(x, w, fp32_out=True)
    assert y.dtype == torch.float32 and y.shape == (3, 70)
    assert ((y.double() - exact).abs().max() / exact.abs().max()).item() < 1e-5  # bf16 output: ~2e-3


def test_limits_come_from_the_library():
    """csrc/common.h owns the limits; the Python side reads them from the loaded library."""
    library = cpu_kernels.library()
    assert cpu_kernels.MAX_ROWS == library.q3n_max_rows() > 0
    assert cpu_kernels.MAX_CONV_KERNEL == library.q3n_max_conv_kernel() > 0


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_fp32_output_is_the_unrounded_sum(bits):
    """The 8/4-bit kernels' fp32_out (quantized lm_head) skips the bf16 rounding, nothing else."""
    from qwen3next.quant import int4, int8

    x, w = bf16(2, 256, seed=3), torch.randn(50, 256, generator=torch.Generator().manual_seed(4))
    arrays = int8.quantize(w) if bits == 8 else int4.quantize(w, 64)
    kernel = cpu_kernels.linear_q8 if bits == 8 else cpu_kernels.linear_q4
    with torch.inference_mode():
        wide, rounded = kernel(x, *arrays, fp32_out=True), kernel(x, *arrays)
    assert wide.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    assert torch.equal(wide.bfloat16(), rounded)  # the same sums, rounded once
    assert not torch.equal(wide, rounded.float())


def test_swiglu_experts_sum_the_chosen_experts():
    E, H, I = 6, 64, 24
    gate_up, down = bf16(E, 2 * I, H, seed=3, scale=0.2), bf16(E, H, I, seed=4, scale=0.2)
    from qwen3next.offload.store import _address_table
    from qwen3next.moe import StackedExperts

    table = _address_table(StackedExperts(gate_up, down))
    x = bf16(H, seed=5)
    ids, weights = torch.tensor([4, 1, 2]), torch.tensor([0.5, 0.3, 0.2])
    expected = sum(
        w * (F.silu(gate_up[e, :I].float() @ x.float()) * (gate_up[e, I:].float() @ x.float())) @ down[e].float().T
        for e, w in zip(ids.tolist(), weights.tolist())
    )
    with torch.inference_mode():
        assert_bf16_close(cpu_kernels.swiglu_experts_bf16(x, table, ids, weights, I), expected)


def test_the_moe_blocks_two_halves_give_the_fused_kernels_bits(models):
    """An expert cache routes, acquires, then computes (moe_route, moe_experts): the fused block's bits."""
    model = qwen3next.load(models("small"), dtype="bfloat16").model
    block = model.model.layers[1].mlp
    weights = block.kernel_weights(block.store.address_table(block.layer))
    for seed in range(3):
        x = bf16(1, model.config.hidden_size, seed=20 + seed)
        with torch.inference_mode():
            out, ids, routing, logits = cpu_kernels.moe_block(x, weights)
            ids2, routing2, logits2, gate_logit = cpu_kernels.moe_route(x, weights)
            out2 = cpu_kernels.moe_experts(x, weights, ids2, routing2, gate_logit)
        assert torch.equal(ids, ids2) and torch.equal(routing, routing2) and torch.equal(logits, logits2)
        assert torch.equal(out, out2)


def test_the_moe_block_gives_each_of_several_tokens_its_bits_alone(models):
    """A verify pass runs its positions through one moe_block call: every row as a one-token call."""
    model = qwen3next.load(models("small"), dtype="bfloat16").model
    block = model.model.layers[1].mlp
    weights = block.kernel_weights(block.store.address_table(block.layer))
    x = bf16(cpu_kernels.MAX_ROWS, model.config.hidden_size, seed=30)
    with torch.inference_mode():
        alone = [cpu_kernels.moe_block(x[t : t + 1], weights) for t in range(len(x))]
        for tokens in (2, 3, cpu_kernels.MAX_ROWS):
            together = cpu_kernels.moe_block(x[:tokens], weights)
            for part, rows in zip(together, zip(*alone)):
                assert torch.equal(part, torch.cat(rows[:tokens])), tokens
        with pytest.raises(ValueError, match="tokens"):
            cpu_kernels.moe_block(bf16(cpu_kernels.MAX_ROWS + 1, model.config.hidden_size), weights)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm(offset):
    x, w = bf16(5, 64, seed=6), bf16(64, seed=7, scale=0.1)
    expected = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * (offset + w.float())
    with torch.inference_mode():
        assert_bf16_close(cpu_kernels.rms_norm_bf16(x, w, 1e-6, offset), expected, slack=2)


def test_attention_over_a_strided_cache():
    buffer_k, buffer_v = bf16(1, 2, 50, 32, seed=8), bf16(1, 2, 50, 32, seed=9)  # capacity 50, 37 used
    keys, values = buffer_k[:, :, :37], buffer_v[:, :, :37]
    query = bf16(1, 8, 1, 32, seed=10)
    expected = F.scaled_dot_product_attention(query.float(), keys.float(), values.float(), enable_gqa=True)
    with torch.inference_mode():
        assert_bf16_close(cpu_kernels.attend_one_bf16(query, keys, values), expected)


def test_deltanet_kernel_matches_the_torch_path(models, monkeypatch):
    """Prefill then token-by-token decode through the fused kernel vs the torch chunked/recurrent code."""
    model = qwen3next.load(models("small"), dtype="bfloat16").model
    layer: GatedDeltaNet = model.model.layers[0].linear_attn
    x = bf16(1, 45, model.config.hidden_size, seed=11)

    def run():
        state, outs = DeltaNetState(), []
        with torch.inference_mode():
            outs.append(layer(x[:, :40], state))
            outs += [layer(x[:, t : t + 1], state) for t in range(40, 45)]
        return torch.cat(outs, dim=1), state

    fused, fused_state = run()
    disable_kernels(monkeypatch)
    plain, plain_state = run()
    assert_bf16_close(fused, plain, slack=8)
    assert_bf16_close(fused_state.recurrent, plain_state.recurrent, slack=8)
    assert torch.equal(fused_state.conv, plain_state.conv)  # the conv history is copied, not computed


def test_bf16_decode_is_as_close_to_fp32_as_the_reference(models):
    """Teacher-forced decode steps through every kernel, held to transformers' own bf16 error."""
    transformers = pytest.importorskip("transformers")
    folder = models("small")
    ids = torch.randint(0, 500, (1, 60), generator=torch.Generator().manual_seed(12))
    exact = qwen3next.load(folder, dtype="float32").logits(ids[0].tolist())[40:]
    model = qwen3next.load(folder, dtype="bfloat16").model
    cache = model.make_cache()
    with torch.inference_mode():
        model(ids[:, :40], cache)
        ours = torch.cat([model(ids[:, t : t + 1], cache)[0] for t in range(40, 60)]).float()
        reference = transformers.Qwen3NextForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        theirs = reference(ids).logits[0, 40:].float()

    def mean_error(logits):
        return ((logits - exact).abs().mean() / exact.abs().mean()).item()

    assert mean_error(ours) < 1.25 * mean_error(theirs)



BLOCKS = (2, 3, 4, 5, 8, 37, 128, 512)  # 1-4 rows and more take different integer paths on AVX2


def quantized(bits: int, out_features: int, in_features: int, group: int = 64, seed: int = 0):
    from qwen3next.quant import int4, int8

    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * in_features**-0.5
    return int8.quantize(w) if bits == 8 else int4.quantize(w, group)


# (out, in, group): the integer tiles' own shapes, rows past a tile's 16 lanes, fewer rows than a tile, rows
# long enough for AVX-512's in-order read of a few rows (1024), and the shapes the tiles leave to the row loops
# (in not a multiple of 128, groups other than 64)
SHAPES = [(48, 256, 64), (37, 512, 64), (37, 1024, 64), (5, 128, 64), (21, 192, 64), (19, 256, 32), (9, 256, 128)]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("out_features, in_features, group", SHAPES)
def test_quantized_rows_do_not_depend_on_the_rows_beside_them(bits, out_features, in_features, group):
    """A row's result is the same bits alone or in a block of any size (a speculative verify pass relies on it)."""
    from qwen3next.quant.modules import KERNEL_ROWS, quantized_matmul

    arrays = list(quantized(bits, out_features, in_features, group))
    x = bf16(max(BLOCKS), in_features, seed=5)
    with torch.inference_mode():
        alone = torch.cat([quantized_matmul(x[r : r + 1], bits, arrays, fp32_out=True) for r in range(len(x))])
        # without the integer tiles, blocks past KERNEL_ROWS are a GEMM on the dequantized matrix
        for rows in [n for n in BLOCKS if n <= KERNEL_ROWS or cpu_kernels.integer_tiles()]:
            blocks = torch.cat([quantized_matmul(x[i : i + rows], bits, arrays, fp32_out=True)
                                for i in range(0, len(x), rows)])
            assert torch.equal(blocks, alone), rows


def test_a_4_bit_weight_row_has_the_same_bits_in_a_full_tile_and_in_a_partial_one():
    """Full 16-row tiles and the partial one at a matrix's end gather their scales differently; a row's result
    must not depend on which it falls in. 512 columns: 8 groups, where full tiles take their own way."""
    from qwen3next.quant.modules import quantized_matmul

    packed, scale, minimum = quantized(4, 37, 512, seed=7)
    x = bf16(3, 512, seed=8)
    moved = [torch.cat([a[32:], a[:27]]) for a in (packed, scale, minimum)]  # rows 32-36 first: a full tile
    with torch.inference_mode():
        partial = quantized_matmul(x, 4, [packed, scale, minimum], fp32_out=True)[:, 32:]
        full = quantized_matmul(x, 4, moved, fp32_out=True)[:, :5]
    assert torch.equal(partial, full)


@pytest.mark.parametrize("rows", [1, 64])
def test_4_bit_kernels_stay_near_the_dequantized_weights(rows):
    """The integer paths centre the 4-bit codes on 8 before they meet the int8 activation codes: 0.56-0.66% of
    the largest output on such shapes, against 0.84-1.46% uncentred (docs/kernels.md); the bound lies between."""
    from qwen3next.quant import int4
    from qwen3next.quant.modules import quantized_matmul

    arrays = list(quantized(4, 512, 2048, seed=9))  # the AVX-512 tile's shapes: groups of 64, rows of 128k
    x = bf16(rows, 2048, seed=8)
    with torch.inference_mode():
        got = quantized_matmul(x, 4, arrays, fp32_out=True)
    expected = x.float() @ int4.dequantize(*arrays, dtype=torch.float32).T
    assert (got - expected).abs().max() < 0.008 * expected.abs().max()


@pytest.mark.parametrize("in_features", [256, 200, 72, 9, 1000])
def test_bf16_linear_rows_do_not_depend_on_the_rows_beside_them(in_features):
    """Every row count up to MAX_ROWS gives each row its one-row bits, tails of the vector loops included."""
    weight = bf16(33, in_features, seed=3)
    x = bf16(cpu_kernels.MAX_ROWS, in_features, seed=4)
    for fp32_out in (False, True):
        alone = torch.cat([cpu_kernels.linear_bf16(x[r : r + 1], weight, fp32_out) for r in range(len(x))])
        for rows in range(2, cpu_kernels.MAX_ROWS + 1):
            assert torch.equal(cpu_kernels.linear_bf16(x[:rows], weight, fp32_out), alone[:rows]), rows
        assert torch.allclose(alone.float(), x.float() @ weight.float().T, rtol=2e-2, atol=2e-2)


def expert_blobs(bits: int, experts: int, hidden: int, inter: int):
    """Random quantized expert blobs in quant/layout.py's format: (blobs, their address table, the layout)."""
    from qwen3next.quant.layout import ExpertLayout

    layout = ExpertLayout.build(hidden, inter, {p: {"bits": bits, "group": 64} for p in ("gate_proj", "up_proj",
                                                                                          "down_proj")})
    blobs = []
    for e in range(experts):
        blob = torch.zeros(layout.nbytes, dtype=torch.uint8)
        for i, p in enumerate(layout.projections.values()):
            for offset, array in zip(p.offsets, quantized(bits, p.rows, p.cols, p.group, seed=10 * e + i)):
                raw = array.contiguous().view(torch.uint8).flatten()
                blob[offset : offset + raw.numel()] = raw
        blobs.append(blob)
    return blobs, torch.tensor([b.data_ptr() for b in blobs], dtype=torch.int64), layout


def routing(tokens: int, experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random distinct experts per token (ids [tokens, top_k] int64) and their weights (fp32, summing to 1)."""
    ids = torch.stack([torch.randperm(experts, generator=torch.Generator().manual_seed(t))[:top_k]
                       for t in range(tokens)])
    return ids, torch.softmax(torch.randn(tokens, top_k, generator=torch.Generator().manual_seed(7)), -1)


def experts_three_ways(x, table, layout, ids, weights):
    """The experts kernel on a whole chunk, on each token alone (decode steps), and on each expert's own rows
    with its one row of the table, then combined (an expert cache handing out experts one at a time)."""
    top_k, hidden = ids.shape[1], x.shape[1]
    chunk = cpu_kernels.experts_quant(x, table, layout, ids, weights)
    alone = torch.stack([cpu_kernels.experts_quant(x[t], table, layout, ids[t], weights[t]) for t in range(len(x))])
    pairs = torch.empty(ids.numel(), hidden)
    flat = ids.flatten()
    for e in flat.unique().tolist():
        chosen = (flat == e).nonzero().flatten()
        rows = torch.arange(len(chosen))
        pairs[chosen] = cpu_kernels.experts_pairs(x[chosen // top_k], table[e : e + 1], layout, torch.zeros_like(rows),
                                                  rows)
    return chunk, alone, cpu_kernels.experts_combine(pairs, weights)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_experts_rows_do_not_depend_on_the_chunk(bits):
    """Tokens through quantized experts: a token alone (a decode step), inside a prefill chunk, and expert by
    expert then combined (the expert cache under a budget) give the same bits, close to the dequantized sums."""
    from qwen3next.offload.quantized_experts import kernel_layout, run_expert

    experts, hidden, inter, top_k, tokens = 12, 256, 80, 3, 40  # inter 80: down's rows take the row loops
    blobs, table, layout = expert_blobs(bits, experts, hidden, inter)
    x, (ids, weights) = bf16(tokens, hidden, seed=6), routing(tokens, experts, top_k)
    with torch.inference_mode():
        chunk, alone, combined = experts_three_ways(x, table, kernel_layout(layout), ids, weights)
        expected = torch.stack([sum(w * run_expert(blobs[e], layout, x[t : t + 1].float())[0]  # dequantized, fp32
                                    for e, w in zip(ids[t].tolist(), weights[t].tolist())) for t in range(tokens)])
    assert torch.equal(chunk, alone) and torch.equal(chunk, combined)
    assert_bf16_close(chunk, expected, slack=8 if bits == 8 else 16)


@pytest.mark.parametrize("hidden, inter", [(256, 80), (204, 52)])  # 204, 52: columns past the 8-wide vector loop
def test_bf16_experts_rows_do_not_depend_on_the_chunk(hidden, inter):
    """bf16 experts through the experts kernel (prefill where torch's bf16 GEMM is slow): a token alone, inside a
    chunk, and expert by expert then combined (an expert cache) give the same bits, within bf16 roundings of fp32."""
    from qwen3next.moe import StackedExperts
    from qwen3next.offload.store import _address_table

    experts, top_k, tokens = 12, 3, 41
    gate_up, down = bf16(experts, 2 * inter, hidden, seed=3, scale=0.2), bf16(experts, hidden, inter, seed=4, scale=0.2)
    table = _address_table(StackedExperts(gate_up, down))
    x, (ids, weights) = bf16(tokens, hidden, seed=6), routing(tokens, experts, top_k)
    with torch.inference_mode():
        chunk, alone, combined = experts_three_ways(x, table, cpu_kernels.bf16_layout(inter, hidden), ids, weights)
        gate, up = (torch.einsum("th,tkih->tki", x.float(), part[ids].float()) for part in gate_up.split(inter, 1))
        acts = (F.silu(gate) * up).bfloat16().float()  # the activations are bf16, as a bf16 matmul leaves them
        expected = torch.einsum("tki,tkhi,tk->th", acts, down[ids].float(), weights)
    assert torch.equal(chunk, alone) and torch.equal(chunk, combined)
    assert_bf16_close(chunk, expected, slack=8)
