"""CPU kernels vs torch on this CPU: the numbers behind csrc/decode_kernels.c and quant_kernels.c (docs/kernels.md).

    python benchmarks/bench_kernels.py
    python benchmarks/bench_kernels.py --few-rows      # PYTHONPATH=OTHER_CHECKOUT for its kernels (bf16, 4-bit)
    python benchmarks/bench_kernels.py --error         # the same; accuracy, not speed
    python benchmarks/bench_kernels.py --experts       # only the bf16 routed experts of a prefill chunk
    python benchmarks/bench_kernels.py --gemv          # only the one-row products (QWEN3NEXT_KERNEL_CFLAGS for other paths)
    python benchmarks/bench_kernels.py --prefill MODEL [--tokens 512] [--baseline CHECKOUT] [--rounds 3]

Without --prefill: matrix-vector products over weights that do not fit in cache (each call reads a
different matrix, as decode does) for bf16, int8 and int4 weights (ours, and torch's own weight-only
int8 and int4 CPU kernels on their own layouts), many rows through quantized matrices (our kernels in
one call against dequantizing the matrix for a bf16 GEMM, alternating), the one-call MoE decode block,
and one Gated DeltaNet layer over a 256-token prompt.

With --prefill: one prefill chunk of --tokens tokens through MODEL, timed per module kind, in a fresh
subprocess per round, then DECODE_STEPS decode steps on its cache; with --baseline (another checkout of
this repository, e.g. from `git worktree add` or `git archive`) the same measurement of that tree's code
alternates with this one's, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def last_level_cache_bytes() -> int | None:
    """The L3's size from Linux's sysfs (None elsewhere): whether a cycle of weights really leaves the caches."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        return None
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


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
    l3 = last_level_cache_bytes()
    if l3 and l3 * 4 > CACHE_BUSTING_BYTES:  # the 4-bit copies (~0.28x of bf16) would sit in the L3
        print(f"note: this CPU's {l3 / 2**20:.0f} MiB L3 holds much of the quantized columns' "
              f"{CACHE_BUSTING_BYTES / 2**20:.0f} MiB cycle: they are L3 figures here (--few-rows reads 4-bit from RAM)")
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
        cpu_kernels.moe_block(x, weights[state["i"]])

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


def rows_table() -> None:
    """Many rows through quantized matrices (an expert's 4-bit gate and down, an 8-bit DeltaNet input
    projection at real width): the kernel in one call against dequantizing for a bf16 GEMM, best of 3 alternated."""
    from qwen3next.quant.modules import dequantize, linear

    print(f"\n{'rows x matrix':<28}{'kernel (ms)':>12}{'dequantized (ms)':>18}{'kernel GMAC/s':>15}")
    for bits, (out_features, in_features) in [(4, (512, 2048)), (4, (2048, 512)), (8, (12288, 2048))]:
        w = torch.randn(out_features, in_features) * in_features**-0.5
        arrays = int4.quantize(w, 64) if bits == 4 else int8.quantize(w)
        kernel = cpu_kernels.linear_q4 if bits == 4 else cpu_kernels.linear_q8
        for rows in (1, 8, 20, 64, 128, 512):
            x = torch.randn(rows, in_features, dtype=torch.bfloat16)
            calls = max(1, 64 // rows)
            ours = theirs = float("inf")
            for _ in range(3):
                ours = min(ours, seconds_per_call(lambda: kernel(x, *arrays), calls))
                theirs = min(theirs, seconds_per_call(lambda: linear(x, dequantize(bits, arrays, x.dtype)), calls))
            label = f"{rows} x {bits}-bit {[out_features, in_features]}"
            print(f"{label:<28}{ours * 1e3:>12.2f}{theirs * 1e3:>18.2f}{rows * w.numel() / ours / 1e9:>15.1f}")


def experts_table() -> None:
    """One layer's routed bf16 experts on a prefill chunk's rows (each expert on the rows that chose it): torch's
    grouped bf16 matmul (moe.StackedExperts, the path CPUs with a fast bf16 GEMM keep) against the experts kernel
    (offload/bf16_experts.bf16_rows_kernel's call), best of 3 alternated; multiply-adds per second."""
    from qwen3next.moe import StackedExperts
    from qwen3next.offload.store import _address_table

    print(f"\n{'bf16 experts (E x rows each)':<40}{'grouped (ms)':>13}{'kernel (ms)':>13}{'grouped GMAC/s':>16}"
          f"{'kernel GMAC/s':>15}")
    for experts, hidden, inter, rows, top_k in [(64, 512, 256, 32, 8), (64, 2048, 512, 10, 10)]:
        gate_up = (torch.randn(experts, 2 * inter, hidden) * hidden**-0.5).bfloat16()
        down = (torch.randn(experts, hidden, inter) * inter**-0.5).bfloat16()
        stacked = StackedExperts(gate_up, down).requires_grad_(False)
        table, layout = _address_table(stacked), cpu_kernels.bf16_layout(inter, hidden)
        tokens = experts * rows // top_k  # every expert chosen by `rows` tokens, each token by top_k experts
        ids = (torch.arange(tokens * top_k) % experts).view(tokens, top_k)
        weights = torch.full((tokens, top_k), 1.0 / top_k)
        x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
        ours = theirs = float("inf")
        for _ in range(3):
            theirs = min(theirs, seconds_per_call(lambda: stacked(x, ids, weights), 1))
            ours = min(ours, seconds_per_call(lambda: cpu_kernels.experts_quant(x, table, layout, ids, weights), 1))
        macs = tokens * top_k * 3 * hidden * inter
        label = f"{experts} x {rows}, hidden {hidden}, width {inter}"
        print(f"{label:<40}{theirs * 1e3:>13.1f}{ours * 1e3:>13.1f}"
              f"{macs / theirs / 1e9:>16.1f}{macs / ours / 1e9:>15.1f}")


def few_rows_table() -> None:
    """A few rows through the demo model's bf16 matrices, in cache (a speculative verify pass's shape): each
    row's chain of multiply-adds, not memory, sets the pace there. Best of 3."""
    print(f"\n{'bf16 matrix':<16}" + "".join(f"{f'{rows} row(s) (us)':>16}" for rows in (1, 2, 4)))
    for out_features, in_features in [(768, 256), (256, 256), (6144, 256)]:
        w = (torch.randn(out_features, in_features) * in_features**-0.5).bfloat16()
        times = []
        for rows in (1, 2, 4):
            x = torch.randn(rows, in_features, dtype=torch.bfloat16)
            times.append(min(seconds_per_call(lambda: cpu_kernels.linear_bf16(x, w), 2000) for _ in range(3)))
        print(f"{str([out_features, in_features]):<16}" + "".join(f"{t * 1e6:>16.1f}" for t in times))
    few_rows_q4_table()


FEW_ROWS_RAM_BYTES = 3 * 2**29  # 1.5 GiB of 4-bit weights: more than any L3 so far (480 MiB on one host here)


def few_rows_q4_table() -> None:
    """1-8 rows through 4-bit matrices (a verify pass at real width): GB/s of weights, once in cache and once
    from RAM (a different matrix each call, FEW_ROWS_RAM_BYTES in all). Up to 4 rows the kernel reads rows in
    order (q4_tile_few); there the work per activation row, not the read, sets the pace. Best of 2."""
    rows_list = (1, 2, 3, 4, 5, 8)
    header = "".join(f"{f'{rows} row(s)':>10}" for rows in rows_list)
    print(f"\n{'4-bit matrix':<24}{header}   (GB/s of 4.5-bit weights)")
    for (out_features, in_features), from_ram in [((1024, 2048), False), ((12288, 2048), True), ((151936, 2048), True)]:
        count = max(2, FEW_ROWS_RAM_BYTES * 2 // (out_features * in_features)) if from_ram else 1
        stored = [int4.quantize((torch.randn(out_features, in_features) * 0.05).bfloat16(), 64) for _ in range(count)]
        figures = []
        for rows in rows_list:
            x = torch.randn(rows, in_features, dtype=torch.bfloat16)
            state = {"i": 0}

            def step():
                state["i"] = (state["i"] + 1) % count
                cpu_kernels.linear_q4(x, *stored[state["i"]])

            seconds = min(seconds_per_call(step, max(3 * count, 200 if from_ram else 2000)) for _ in range(2))
            figures.append(out_features * in_features * 4.5 / 8 / seconds / 1e9)
        label = f"{[out_features, in_features]} {'RAM' if from_ram else 'cache'}"
        print(f"{label:<24}" + "".join(f"{f:>10.1f}" for f in figures))


DECODE_STEPS = 32


def error_table() -> None:
    """The 4-bit kernels against fp32 math on the dequantized weights (the integer paths round the activations
    to int8 codes), on fixed seeds, so that two trees compare exactly (PYTHONPATH on the other one)."""
    print("\n4-bit kernel (fp32 out) vs fp32 on the dequantized weights: max error, % of the largest output; "
          "rms error, % of the outputs' rms")
    print(f"  {'rows x matrix':<22}{'max':>8}{'rms':>8}")
    torch.manual_seed(0)
    for out, inp, rows in [(4000, 64, 8), (4000, 128, 1), (512, 2048, 1), (512, 2048, 64), (2048, 512, 16)]:
        packed, scale, minimum = int4.quantize((torch.randn(out, inp) * 0.05).bfloat16())
        x = torch.randn(rows, inp).bfloat16()
        got = cpu_kernels.linear_q4(x, packed, scale, minimum, fp32_out=True)
        expected = x.float() @ int4.dequantize(packed, scale, minimum, dtype=torch.float32).T
        largest, error = expected.abs().max(), got - expected
        print(f"  {f'{rows} x [{out}, {inp}]':<22}{100 * error.abs().max() / largest:>7.3f}%"
              f"{100 * error.pow(2).mean().sqrt() / expected.pow(2).mean().sqrt():>7.3f}%")


def prefill_child(model: str, tokens: int, repeats: int) -> None:
    """One tree's measurement: the best of `repeats` prefill chunks, and that chunk's time per module kind."""
    sys.path.insert(0, str(Path(__file__).parent))
    import qwen3next
    from decode_breakdown import instrument

    engine = qwen3next.load(model)
    seconds = instrument(engine)
    ids = torch.randint(0, engine.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    best, parts = float("inf"), {}
    with torch.inference_mode():
        engine.model(ids[:, :16], engine.model.make_cache(), last_only=True)  # warm: thread start-up, first touches
        for _ in range(repeats):
            seconds.clear()
            cache = engine.model.make_cache()
            start = time.perf_counter()
            engine.model(ids, cache, last_only=True)
            if time.perf_counter() - start < best:
                best, parts = time.perf_counter() - start, dict(seconds)
        start = time.perf_counter()
        for step in range(DECODE_STEPS):  # then decode on that cache: the one-row kernels, which must not slow down
            engine.model(ids[:, step : step + 1], cache, last_only=True)
    print(json.dumps({"seconds": best, "parts": parts, "decode": (time.perf_counter() - start) / DECODE_STEPS}))


def import_tree(checkout: Path, folder: Path) -> Path:
    """A folder for PYTHONPATH under which `import qwen3next` (and its quant, offload, cli subpackages, which the
    repository keeps at top level) loads `checkout`'s code rather than the installed tree."""
    package = folder / "qwen3next"
    package.mkdir(parents=True)
    for entry in (checkout / "qwen3next").iterdir():
        (package / entry.name).symlink_to(entry)
    for sub in ("quant", "offload", "cli"):
        (package / sub).symlink_to(checkout / sub)
    return folder


def prefill_table(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this tree": None}
        if args.baseline:
            trees = {"baseline": import_tree(Path(args.baseline).resolve(), Path(tmp)), **trees}
        best: dict[str, dict] = {}
        decodes: dict[str, dict] = {}
        for _ in range(args.rounds):  # alternating subprocesses: the machine's noise falls on both
            for name, path in trees.items():
                env = dict(os.environ, **({"PYTHONPATH": str(path)} if path else {}))
                command = [sys.executable, __file__, "--child", "--prefill", args.prefill, "--tokens", str(args.tokens),
                           "--threads", str(args.threads), "--repeats", str(args.repeats)]
                done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                if name not in best or result["seconds"] < best[name]["seconds"]:
                    best[name] = result
                if name not in decodes or result["decode"] < decodes[name]["decode"]:
                    decodes[name] = result
    print(f"prefill chunk of {args.tokens} tokens, {args.prefill}, {torch.get_num_threads()} threads, "
          f"best of {args.rounds}" + "".join(f"{name:>14}" for name in best))
    kinds = sorted({k for r in best.values() for k in r["parts"]}, key=lambda k: -max(r["parts"].get(k, 0)
                                                                                       for r in best.values()))
    for kind in kinds:
        print(f"  {kind:<40}" + "".join(f"{r['parts'].get(kind, 0) * 1e3:>12.0f}ms" for r in best.values()))
    print(f"  {'whole chunk':<40}" + "".join(f"{r['seconds'] * 1e3:>12.0f}ms" for r in best.values()))
    print(f"  {'prefill tokens/s':<40}" + "".join(f"{args.tokens / r['seconds']:>14.1f}" for r in best.values()))
    print(f"  {'decode tokens/s (best round)':<40}" + "".join(f"{1 / r['decode']:>14.1f}" for r in decodes.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill", metavar="MODEL", help="time a prefill chunk through this model folder")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--baseline", metavar="CHECKOUT", help="another checkout to measure alternately")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="chunks per subprocess")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--few-rows", action="store_true", help="only the few-rows bf16 and 4-bit tables (seconds)")
    parser.add_argument("--error", action="store_true", help="only the 4-bit kernels' error table (seconds)")
    parser.add_argument("--experts", action="store_true", help="only the bf16 routed-experts table (seconds)")
    parser.add_argument("--gemv", action="store_true", help="only the one-row table, weights from RAM (a minute)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return prefill_child(args.prefill, args.tokens, args.repeats)
    if args.prefill:
        return prefill_table(args)
    if cpu_kernels.library() is None:
        raise SystemExit("the decode kernels could not be built here (no C compiler?)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with torch.inference_mode():
        if args.error:
            return error_table()
        if args.experts:
            return experts_table()
        if args.gemv:
            return gemv_table()
        few_rows_table()
        if args.few_rows:
            return
        gemv_table()
        rows_table()
        experts_table()
        moe_block_table()
        deltanet_table()


if __name__ == "__main__":
    main()
