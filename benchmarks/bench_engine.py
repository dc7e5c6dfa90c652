"""Prefill and decode speed and peak memory: qwen3next vs transformers on the same checkpoint.

    python benchmarks/bench_engine.py                 # the issue's config: hidden 512, 8 layers, 64 experts top-8
    python benchmarks/bench_engine.py --size small --prompt-tokens 128 --new-tokens 32

Writes a seeded random bf16 checkpoint in the Hugging Face layout (or uses --model), then runs
each implementation in its own subprocess (so peak RSS is its own), alternating between them
for --rounds rounds (the machines are noisy: alternation spreads the noise over both), and
prints the best figures of each. Needs transformers installed (pip install -e ".[test]").
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def peak_memory_mib(device: str) -> float:
    """Peak GPU allocation on CUDA, peak resident set size otherwise."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_ids(count: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (count,), generator=torch.Generator().manual_seed(0)).tolist()


def measure_ours(folder: Path, args) -> dict:
    import qwen3next

    engine = qwen3next.load(folder, dtype=args.dtype, device=args.device)
    engine.eos_ids = []  # always generate the full count, like min_new_tokens on the reference side
    ids = prompt_ids(args.prompt_tokens, engine.tokenizer.vocab_size)
    engine.complete(qwen3next.Request(prompt=ids, max_new_tokens=2, temperature=0))  # warm-up, as the reference side does
    runs = []
    for _ in range(args.repeats):
        result = engine.complete(qwen3next.Request(prompt=ids, max_new_tokens=args.new_tokens, temperature=0))
        assert len(result.tokens) == args.new_tokens
        runs.append({"prefill_tok_s": result.timings.prefill_tokens_per_second(len(ids)),
                     "decode_tok_s": result.timings.decode_tokens_per_second})
    return runs


def measure_transformers(folder: Path, args) -> dict:
    import transformers

    dtype = getattr(torch, args.dtype)
    model = transformers.Qwen3NextForCausalLM.from_pretrained(folder, dtype=dtype).eval().to(args.device)
    ids = torch.tensor([prompt_ids(args.prompt_tokens, model.config.vocab_size - 64)], device=args.device)

    def timed_generate(new_tokens: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)
        return time.perf_counter() - start

    timed_generate(2)  # warm-up
    runs = []
    for _ in range(args.repeats):
        prefill = timed_generate(1)
        total = timed_generate(args.new_tokens)
        runs.append({"prefill_tok_s": args.prompt_tokens / prefill,
                     "decode_tok_s": (args.new_tokens - 1) / (total - prefill)})
    return runs


def best_of(runs: list[dict]) -> dict:
    """Per figure, the best run: speeds are highest, memory lowest."""
    return {k: (max if k.endswith("tok_s") else min)(run[k] for run in runs) for k in runs[0]}


def child(args) -> None:
    torch.set_num_threads(args.threads)
    measure = measure_ours if args.impl == "qwen3next" else measure_transformers
    result = best_of(measure(Path(args.model), args))
    result["peak_memory_mib"] = peak_memory_mib(args.device)
    print(json.dumps(result))


def write_checkpoint(size: str, folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints import write_model

    return write_model(folder, size, seed=0, dtype=torch.bfloat16, max_shard_bytes=200 * 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="an existing model folder (default: write a random one)")
    parser.add_argument("--size", default="bench", help="fixture size when writing a model (tests/checkpoints.py)")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="runs per subprocess")
    parser.add_argument("--rounds", type=int, default=2, help="subprocesses per implementation, alternating")
    parser.add_argument("--impl", choices=["qwen3next", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=["qwen3next", "transformers"], help="run one implementation")
    args = parser.parse_args()
    if args.impl:
        return child(args)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else write_checkpoint(args.size, Path(tmp) / args.size)
        print(f"model: {folder if args.model else args.size}, {args.dtype}, prompt {args.prompt_tokens} tokens, "
              f"{args.new_tokens} new tokens, {args.device}, {args.threads} threads, best of {args.rounds}x{args.repeats}")
        impls = [args.only] if args.only else ["qwen3next", "transformers"]
        runs: dict[str, list[dict]] = {}
        for _ in range(args.rounds):
            for impl in impls:
                command = [sys.executable, __file__, "--impl", impl, "--model", str(folder)] + [
                    f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                    if k in ("prompt_tokens", "new_tokens", "dtype", "threads", "repeats", "device")
                ]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{impl} failed:\n{done.stderr}")
                runs.setdefault(impl, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
        results = {impl: best_of(r) for impl, r in runs.items()}
    memory = "peak GPU MiB" if args.device.startswith("cuda") else "peak RSS MiB"
    print(f"{'implementation':<14} {'prefill tok/s':>14} {'decode tok/s':>13} {memory:>13}")
    for impl, r in results.items():
        print(f"{impl:<14} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f} {r['peak_memory_mib']:>13.0f}")
    if len(results) == 2:
        ours, ref = results["qwen3next"], results["transformers"]
        print(f"speed-up: prefill {ours['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x, "
              f"decode {ours['decode_tok_s'] / ref['decode_tok_s']:.2f}x")


if __name__ == "__main__":
    main()
