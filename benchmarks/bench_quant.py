"""Quantization throughput and peak RSS, then decode speed of the 4-bit and 8-bit results against bf16.

    python benchmarks/bench_quant.py                       # the real model's widths, 4 layers (~14.5 GB bf16)
    python benchmarks/bench_quant.py --with-transformers   # add transformers' bf16 decode (needs ~16 GB more RAM)

The checkpoint (tests/checkpoints.py size "real": hidden 2048, 512 experts of 512 top-10, 16/2 attention
heads of 256, 16/32 linear heads of 128, the real 151,936-token vocabulary; no MTP layer, which decode
does not read and which would add 3.2 GB to the bf16 model in RAM) is written once into --workdir and
reused. Each quantization runs as `qwen3next quantize` in its own process,
which reports its own peak RSS. Decode runs alternate between the models for --rounds rounds, each in
its own process (benchmarks/bench_engine.py's child mode), and the best figures are printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_engine import best_of  # noqa: E402
ENGINE_BENCH = ROOT / "benchmarks" / "bench_engine.py"
# A `qwen3next` process that reports its own peak RSS (bytes) on stderr.
_MEASURED_CLI = ("import resource, sys; from qwen3next.cli.main import main; code = main(sys.argv[1:]); "
                 "print('peak_rss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr); "
                 "sys.exit(code)")


def source_checkpoint(workdir: Path) -> Path:
    folder = workdir / "bf16"
    if (folder / "config.json").exists():
        return folder
    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints import write_model

    print(f"writing the bf16 checkpoint into {folder} (once)", file=sys.stderr)
    partial = workdir / "bf16.partial"
    write_model(partial, "real", seed=0, dtype=torch.bfloat16, max_shard_bytes=2 * 2**30, vocab_size=151936, mtp=False)
    partial.rename(folder)
    return folder


def folder_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def quantize(src: Path, out: Path, bits: int) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _MEASURED_CLI, "quantize", str(src), str(out), "--bits", str(bits),
                           "--force", "-q"], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"quantize --bits {bits} failed:\n{done.stderr}")
    peak = int(done.stderr.split("peak_rss")[-1].split()[0])
    source = folder_bytes(src)
    return {"seconds": seconds, "mb_s": source / seconds / 1e6, "peak_rss_mib": peak / 2**20,
            "output_gb": folder_bytes(out) / 1e9, "source_gb": source / 1e9}


def decode(impl: str, folder: Path, args) -> dict:
    command = [sys.executable, str(ENGINE_BENCH), "--impl", impl, "--model", str(folder), "--dtype=bfloat16",
               f"--prompt-tokens={args.prompt_tokens}", f"--new-tokens={args.new_tokens}", f"--threads={args.threads}",
               f"--repeats={args.repeats}", "--device=cpu"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{impl} on {folder} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qwen3next-bench-real"))
    parser.add_argument("--model", type=Path, help="an existing bf16 model folder instead of the written one")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--with-transformers", action="store_true")
    parser.add_argument("--skip-quantize", action="store_true", help="reuse the quantized folders in --workdir")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = args.model or source_checkpoint(args.workdir)
    outputs = {bits: args.workdir / f"q{bits}" for bits in args.bits}

    if not args.skip_quantize:
        print(f"{'quantize':<10} {'source GB':>9} {'output GB':>9} {'seconds':>8} {'MB/s':>7} {'peak RSS MiB':>12}")
        for bits, out in outputs.items():
            r = quantize(src, out, bits)
            print(f"--bits {bits:<3} {r['source_gb']:>9.2f} {r['output_gb']:>9.2f} {r['seconds']:>8.1f} "
                  f"{r['mb_s']:>7.0f} {r['peak_rss_mib']:>12.0f}", flush=True)

    variants = [("qwen3next bf16", "qwen3next", src)] + [(f"qwen3next {b}-bit", "qwen3next", o) for b, o in outputs.items()]
    if args.with_transformers:
        variants.append(("transformers bf16", "transformers", src))
    runs: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for name, impl, folder in variants:
            runs.setdefault(name, []).append(decode(impl, folder, args))
    print(f"\ndecode: prompt {args.prompt_tokens} tokens, {args.new_tokens} new, {args.threads} threads, "
          f"best of {args.rounds}x{args.repeats}")
    print(f"{'model':<20} {'prefill tok/s':>13} {'decode tok/s':>12} {'vs bf16':>8} {'peak RSS MiB':>12}")
    best = {name: best_of(rs) for name, rs in runs.items()}
    base = best["qwen3next bf16"]["decode_tok_s"]
    for name, r in best.items():
        print(f"{name:<20} {r['prefill_tok_s']:>13.1f} {r['decode_tok_s']:>12.1f} {r['decode_tok_s'] / base:>7.2f}x "
              f"{r['peak_memory_mib']:>12.0f}")


if __name__ == "__main__":
    main()
