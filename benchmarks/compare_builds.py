"""Prefill and decode of one model through two builds of the engine, alternating: another checkout against
this one, or this tree's kernels built two ways (QWEN3NEXT_KERNEL_CFLAGS), e.g. the AVX2 path against the
AVX-512 one on a machine that has both.

    python benchmarks/compare_builds.py MODEL --baseline OTHER_CHECKOUT [--rounds 2]
    python benchmarks/compare_builds.py MODEL --cflags "" --cflags "-mno-avx512f"

OTHER_CHECKOUT is a tree of this repository (`git worktree add /tmp/base REV`); each run is
bench_engine.py's own measurement (a --prompt-tokens prompt, then --new-tokens tokens) in a fresh
process with PYTHONPATH on that tree, so each build compiles and caches its own kernels. The machine's
load moves figures by tens of percent, so sides alternate and each round's pair is what compares.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(tree: Path, cflags: str | None, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    if cflags is not None:
        env["QWEN3NEXT_KERNEL_CFLAGS"] = cflags
    done = subprocess.run([sys.executable, str(tree / "benchmarks" / "bench_engine.py"), "--impl", "qwen3next",
                           "--model", args.model, f"--prompt-tokens={args.prompt_tokens}",
                           f"--new-tokens={args.new_tokens}", f"--threads={args.threads}", "--repeats=2"],
                          env=env, cwd="/", capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{tree} ({cflags or 'default flags'}): bench_engine.py failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--baseline", type=Path, help="another checkout, measured against this one")
    parser.add_argument("--cflags", action="append", help="kernel flags of one side (give two; this tree)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.baseline is not None and args.cflags is None:
        sides = [(f"baseline {args.baseline}", args.baseline.resolve(), None), ("this tree", ROOT, None)]
    elif args.baseline is None and args.cflags is not None and len(args.cflags) == 2:
        sides = [(f"flags '{flags}'", ROOT, flags) for flags in args.cflags]
    else:
        parser.error("give --baseline CHECKOUT, or --cflags twice")
    print(f"{'round':<6} {'build':<40} {'prefill tok/s':>14} {'decode tok/s':>13}")
    best: dict[str, list[float]] = {}
    for round_ in range(1, args.rounds + 1):
        for name, tree, cflags in sides:
            figures = measure(tree, cflags, args)
            prefill, decode = figures["prefill_tok_s"], figures["decode_tok_s"]
            print(f"{round_:<6} {name:<40} {prefill:14.0f} {decode:13.1f}", flush=True)
            previous = best.get(name, [0.0, 0.0])
            best[name] = [max(previous[0], prefill), max(previous[1], decode)]
    (first, _, _), (second, _, _) = sides
    print(f"best of {args.rounds}: prefill {best[second][0] / best[first][0]:.2f}x, "
          f"decode {best[second][1] / best[first][1]:.2f}x ({second} over {first})")


if __name__ == "__main__":
    main()
