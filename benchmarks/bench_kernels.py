"""Decode kernels vs torch on this CPU: the numbers behind writing csrc/decode_kernels.c and quant_kernels.c.

    python benchmarks/bench_kernels.py

Matrix-vector products over weights that do not fit in cache (each call reads a different
matrix, as decode does) for bf16, int8 and int4 weights (ours, and torch's own weight-only int8 and
int4 CPU kernels on their own layouts), a few rows through an expert's 4-bit matrices (our kernels
MAX_ROWS rows per call against dequantizing the matrix: where quant/modules.KERNEL_ROWS comes from),
the one-call MoE decode block, and one Gated DeltaNet layer over a 256-token prompt.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from qwen3next import cpu_kernels
from qwen3next.cache import DeltaNetState
from qwen3next.config import Qwen3NextConfig
from qwen3next.deltanet import GatedDeltaNet
from qwen3next.moe import SparseMoE, StackedExperts
from qwen3next.offload.store import ResidentExpertStore
from qwen3next.quant import int4, int8

CACHE_BUSTING_BYTES = 256 * 2**20  # cycle through this much weight data so reads come from RAM


def seconds_per_call(fn, calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def torch_int4pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w in torch's own int4 CPU layout (groups of 64, bf16 scale and zero): what _weight_int4pack_mm reads."""
    out_features, in_features = w.shape
    groups = w.float().view(out_features, in_features // 64, 64)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-8)
    codes = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.view(out_features, in_features), 1)
    zero = low + 8 * scale  # torch's convention: w = (code - 8) * scale + zero
    return packed, torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().bfloat16()


def gemv_table() -> None:
    """Weights per second, in billions (G weights/s), for one activation row."""
    variants = {
        "torch bf16": (lambda w: (w,), F.linear, torch.bfloat16),
        "torch fp32": (lambda w: (w.float(),), F.linear, torch.float32),
        "ours bf16": (lambda w: (w,), cpu_kernels.linear_bf16, torch.bfloat16),
        "ours int8": (int8.quantize, cpu_kernels.linear_q8, torch.bfloat16),
        "ours int4": (lambda w: int4.quantize(w, 64), cpu_kernels.linear_q4, torch.bfloat16),
        "torch int8": (lambda w: (int8.quantize(w)[0], int8.quantize(w)[1].bfloat16()), torch._weight_int8pack_mm,
                       torch.bfloat16),
        "torch int4": (torch_int4pack, lambda x, packed, scales: torch._weight_int4pack_mm_for_cpu(x, packed, 64, scales),
                       torch.bfloat16),
    }
    print(f"{'weight [out, in]':<18}" + "".join(f"{name:>12}" for name in variants) + "   (G weights/s)")
    for out_features, in_features in [(256, 512), (512, 512), (3072, 512), (512, 2048), (2048, 512), (4096, 2048),
                                      (151936, 2048)]:
        count = max(2, CACHE_BUSTING_BYTES // (out_features * in_features * 2))
        weights = [torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.05 for _ in range(count)]
        figures = []
        for prepare, call, dtype in variants.values():
            stored = [prepare(w) for w in weights]
            x = torch.randn(1, in_features, dtype=dtype)
            state = {"i": 0}

            def step():
                state["i"] = (state["i"] + 1) % count
                call(x, *stored[state["i"]])

            figures.append(out_features * in_features / seconds_per_call(step, 3 * count) / 1e9)
        print(f"{str([out_features, in_features]):<18}" + "".join(f"{f:>12.2f}" for f in figures))


def moe_block_table() -> None:
    """The one-call MoE decode block on the benchmark model's shapes, layers cycled so weights come from RAM."""
    hidden, experts, inter, top_k, layers = 512, 64, 128, 8, 32
    config = Qwen3NextConfig(
        vocab_size=8, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        linear_num_key_heads=1, linear_num_value_heads=1, linear_key_head_dim=8, linear_value_head_dim=8,
        num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=inter,
        shared_expert_intermediate_size=inter,
    )
    blocks = []
    for layer in range(layers):
        block = SparseMoE(config, layer).bfloat16()
        stacked = StackedExperts(torch.randn(experts, 2 * inter, hidden, dtype=torch.bfloat16) * 0.05,
                                 torch.randn(experts, hidden, inter, dtype=torch.bfloat16) * 0.05)
        block.store = ResidentExpertStore({layer: stacked})
        blocks.append((block, stacked))
    weights = [block.kernel_weights(block.store.address_table(block.layer)) for block, _ in blocks]
    x = torch.randn(1, hidden, dtype=torch.bfloat16)
    state = {"i": 0}

    def step():
        state["i"] = (state["i"] + 1) % layers
        cpu_kernels.moe_block_bf16(x, weights[state["i"]])

    threads = torch.get_num_threads()
    counts = sorted({1, threads})  # how the kernel scales with threads matters as much as its speed
    seconds = {n: float("inf") for n in counts}
    for _ in range(3):  # thread counts alternated, best of three: these machines are noisy
        for n in counts:
            torch.set_num_threads(n)
            seconds[n] = min(seconds[n], seconds_per_call(step, 10 * layers))
    torch.set_num_threads(threads)
    read = (experts * hidden + (top_k + 1) * 3 * inter * hidden + hidden) * 2  # router, chosen + shared experts
    print("\nMoE block, one token (64 experts of 128, top-8, shared 128, hidden 512):")
    for n in counts:
        print(f"  {n} thread{'s' if n > 1 else ''}: {seconds[n] * 1e6:.0f} us, "
              f"{read / seconds[n] / 1e9:.1f} GB/s of weights read")


def deltanet_table() -> None:
    print(f"\n{'DeltaNet layer, 256 tokens':<30} {'torch (chunked)':>16} {'ours (fused)':>14}   (ms, bf16)")
    for hidden, heads, dim in [(512, 16, 32), (2048, 16, 128)]:
        config = Qwen3NextConfig(
            vocab_size=8, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            linear_num_key_heads=heads, linear_num_value_heads=2 * heads, linear_key_head_dim=dim,
            linear_value_head_dim=dim, num_experts=1, num_experts_per_tok=1, moe_intermediate_size=1,
            shared_expert_intermediate_size=1,
        )
        layer = GatedDeltaNet(config).bfloat16()
        x = torch.randn(1, 256, hidden, dtype=torch.bfloat16)
        figures = []
        for use_kernels in (False, True):
            cpu_kernels._lib, cpu_kernels._loaded = None, not use_kernels
            figures.append(seconds_per_call(lambda: layer(x, DeltaNetState()), 5) * 1e3)
        print(f"{f'hidden {hidden}, 32 value heads of {dim}':<30} {figures[0]:>16.1f} {figures[1]:>14.1f}")


def expert_rows_table() -> None:
    """One expert's gate and down 4-bit matrices ([512, 2048], [2048, 512]) for a prefill chunk's rows."""
    from qwen3next.quant.modules import dequantize, linear

    gate, down = int4.quantize(torch.randn(512, 2048), 64), int4.quantize(torch.randn(2048, 512), 64)
    print(f"{'rows':<8}{'kernels (ms)':>14}{'dequantized (ms)':>18}")
    for rows in (8, 20, 40, 80, 128, 200, 400):
        x, h = torch.randn(rows, 2048, dtype=torch.bfloat16), torch.randn(rows, 512, dtype=torch.bfloat16)
        step = cpu_kernels.MAX_ROWS

        def kernels():
            for i in range(0, rows, step):
                cpu_kernels.linear_q4(x[i : i + step], *gate)
                cpu_kernels.linear_q4(h[i : i + step], *down)

        def dequantized():
            linear(x, dequantize(4, gate, x.dtype))
            linear(h, dequantize(4, down, h.dtype))

        ours, theirs = seconds_per_call(kernels, 20), seconds_per_call(dequantized, 20)
        print(f"{rows:<8}{ours * 1e3:>14.2f}{theirs * 1e3:>18.2f}")


def main() -> None:
    torch.set_num_threads(2)
    if cpu_kernels.library() is None:
        raise SystemExit("the decode kernels could not be built here (no C compiler?)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with torch.inference_mode():
        gemv_table()
        expert_rows_table()
        moe_block_table()
        deltanet_table()


if __name__ == "__main__":
    main()
