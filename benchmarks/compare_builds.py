"""Prefill and decode of one model through two builds of the engine, alternating: another checkout against
this one, or this tree's kernels built two ways (QWEN3NEXT_KERNEL_CFLAGS), e.g. the AVX2 path against the
AVX-512 one on a machine that has both.

    python benchmarks/compare_builds.py MODEL --baseline OTHER_CHECKOUT [--rounds 2]
    python benchmarks/compare_builds.py MODEL --cflags="" --cflags=-mno-avx512f   # the = keeps a leading dash a value

    python benchmarks/compare_builds.py MODEL --baseline OTHER_CHECKOUT --in-process [--blocks 30]
    python benchmarks/compare_builds.py --models MODEL_A MODEL_B [--blocks 30]
    python benchmarks/compare_builds.py --matrices --cflags="-mno-avx512f -mno-avxvnni" --cflags=-mno-avx512f

OTHER_CHECKOUT is a tree of this repository (`git worktree add /tmp/base REV`); each run is
bench_engine.py's own measurement (a --prompt-tokens prompt, then --new-tokens tokens) in a fresh
process with PYTHONPATH on that tree, so each build compiles and caches its own kernels. The machine's
load moves figures by tens of percent, so sides alternate and each round's pair is what compares.

--in-process, for a change inside csrc/ only: this tree's model code runs decode steps, and the two
kernel libraries (the baseline tree's, built by a subprocess on it, and this tree's) take turns every
25 steps in one process, so both see the same moments of the machine's load; it prints each side's
median step and the median of the per-block time ratios. The two libraries must share their structs'
layouts (cpu_kernels checks the sizes when it loads each).

--models, in the same way, one library and two model folders (e.g. the same checkpoint at 4 and 8 bits):
decode steps of each model in turn.

--matrices, in the same way without a model: 1 to 512 activation rows through a [2048, 2048] matrix at 8
and 4 bits, and one row through the demo model's 56-wide expert down projection, one thread, the two
libraries taking turns every block of calls; "same bits" says whether the two give equal outputs.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_kernels import import_tree

ROOT = Path(__file__).resolve().parents[1]
IMPORT_ROOT = Path(tempfile.mkdtemp(prefix="q3n-trees-"))  # tree_env's import folders (symlinks), for this run
atexit.register(shutil.rmtree, IMPORT_ROOT, True)


def tree_env(tree: Path, cflags: str | None) -> dict:
    """The environment under which `import qwen3next` loads `tree`'s code, subpackages included (the editable
    install maps qwen3next.offload, .quant and .cli to this checkout's folders whatever PYTHONPATH says)."""
    folder = IMPORT_ROOT / str(abs(hash(tree)))
    if not folder.exists():
        import_tree(tree, folder)
    env = dict(os.environ, PYTHONPATH=str(folder))
    if cflags is not None:
        env["QWEN3NEXT_KERNEL_CFLAGS"] = cflags
    return env


def measure(tree: Path, cflags: str | None, args) -> dict:
    env = tree_env(tree, cflags)
    done = subprocess.run([sys.executable, str(tree / "benchmarks" / "bench_engine.py"), "--impl", "qwen3next",
                           "--model", args.model, f"--prompt-tokens={args.prompt_tokens}",
                           f"--new-tokens={args.new_tokens}", f"--threads={args.threads}", "--repeats=2"],
                          env=env, cwd="/", capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{tree} ({cflags or 'default flags'}): bench_engine.py failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def library_of(tree: Path, cflags: str | None) -> Path:
    """The kernel library that `tree` builds (or has cached) for this machine."""
    env = tree_env(tree, cflags)
    # prepare().path is the cached file; a fresh build's own name is a temporary folder, gone at exit
    done = subprocess.run([sys.executable, "-c", "from qwen3next import cpu_kernels; print(cpu_kernels.prepare(quiet=True).path)"],
                          env=env, cwd="/", capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip() or done.stdout.strip() == "None":
        raise SystemExit(f"{tree}: no kernel library was built ({done.stderr.strip()[-500:]})")
    return Path(done.stdout.strip().splitlines()[-1])


def alternating(blocks: int, run) -> list[list[float]]:
    """Seconds of run(side) for sides 0 and 1, `blocks` times each, the order flipping every block so that
    neither side always follows the other."""
    seconds: list[list[float]] = [[], []]
    for block in range(blocks):
        for side in ((0, 1) if block % 2 == 0 else (1, 0)):
            seconds[side].append(run(side, block))
    return seconds


def in_process(sides: list, args, models: list[str] | None = None) -> None:
    """Decode steps with each side's kernel library (and, given `models`, each side's model) in turn, 25
    steps at a time."""
    import time

    import torch

    import qwen3next
    from qwen3next import cpu_kernels

    libraries = [cpu_kernels._load(library_of(tree, cflags))[0] for _, tree, cflags in sides]
    torch.set_num_threads(args.threads)
    loaded = [qwen3next.load(folder, router_stats=False, quiet=True).model for folder in models or [args.model]]
    prompt = torch.tensor([list(range(100, 100 + min(args.prompt_tokens, 256)))])
    caches = [None, None]

    def decode(side: int, block: int) -> float:
        model = loaded[side % len(loaded)]
        cpu_kernels._lib = libraries[side]
        if block % 20 == 0:  # a fresh context every 20 blocks keeps the attention's share about even
            caches[side] = model.make_cache()
            model(prompt, caches[side], last_only=True)
        start = time.perf_counter()
        for step in range(25):
            model(torch.tensor([[5 + step]]), caches[side], last_only=True)
        return (time.perf_counter() - start) / 25

    with torch.inference_mode():
        seconds = alternating(args.blocks, decode)
    for (name, _, _), times in zip(sides, seconds):
        print(f"{name:<40} median {statistics.median(times) * 1e3:.3f} ms/step, fastest block "
              f"{min(times) * 1e3:.3f}")
    ratios = [first / second for first, second in zip(*seconds)]
    print(f"per-block time ratio {sides[0][0]} / {sides[1][0]}: median {statistics.median(ratios):.3f} "
          f"(above 1: the second is faster), {args.blocks} blocks")


def matrices_in_process(sides: list, args) -> None:
    """Quantized matrix products with each side's kernel library in turn, in one process."""
    import statistics
    import time

    import torch

    from qwen3next import cpu_kernels
    from qwen3next.quant import int4, int8

    libraries = [cpu_kernels._load(library_of(tree, cflags))[0] for _, tree, cflags in sides]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"{'matrix':<22} {'rows':>5} {sides[0][0]:>40} {sides[1][0]:>40} {'median ratio':>13} same bits")
    # (out, in, 4-bit group, activation rows): a real-width matrix, and the demo model's expert down projection
    # (56 wide: no integer path, the fp32 row loops)
    for out, columns, group, rows in [(2048, 2048, 64, r) for r in (1, 4, 64, 512)] + [(256, 56, 56, 1)]:
        weight = torch.randn(out, columns)
        q8, q4 = int8.quantize(weight), int4.quantize(weight, group)
        x = torch.randn(rows, columns).bfloat16()
        for name, call in ((f"8-bit [{out}, {columns}]", lambda: cpu_kernels.linear_q8(x, *q8)),
                           (f"4-bit [{out}, {columns}]", lambda: cpu_kernels.linear_q4(x, *q4))):
            calls = max(1, 2000 // rows)

            def products(side: int, block: int) -> float:
                cpu_kernels._lib = libraries[side]
                start = time.perf_counter()
                for _ in range(calls):
                    call()
                return (time.perf_counter() - start) / calls

            seconds = alternating(args.blocks, products)
            outputs = []
            for library in libraries:
                cpu_kernels._lib = library
                outputs.append(call())
            ratio = statistics.median(first / second for first, second in zip(*seconds))
            print(f"{name:<22} {rows:5d} {statistics.median(seconds[0]) * 1e6:37.1f} us "
                  f"{statistics.median(seconds[1]) * 1e6:37.1f} us {ratio:13.3f} "
                  f"{'yes' if torch.equal(*outputs) else 'no'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--baseline", type=Path, help="another checkout, measured against this one")
    parser.add_argument("--cflags", action="append", help="kernel flags of one side (give two; this tree)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--in-process", action="store_true", help="alternate the kernel libraries in one process")
    parser.add_argument("--blocks", type=int, default=30, help="with --in-process: blocks of 25 steps per side")
    parser.add_argument("--matrices", action="store_true", help="quantized matrix products in one process, no model")
    parser.add_argument("--models", nargs=2, metavar="FOLDER", help="two models' decode in one process, this tree")
    args = parser.parse_args()
    if args.models is not None:
        return in_process([(folder, ROOT, None) for folder in args.models], args, args.models)
    if args.baseline is not None and args.cflags is None:
        sides = [(f"baseline {args.baseline}", args.baseline.resolve(), None), ("this tree", ROOT, None)]
    elif args.baseline is None and args.cflags is not None and len(args.cflags) == 2:
        sides = [(f"flags '{flags}'", ROOT, flags) for flags in args.cflags]
    else:
        parser.error("give --baseline CHECKOUT, or --cflags twice")
    if args.matrices:
        return matrices_in_process(sides, args)
    if args.model is None:
        parser.error("give MODEL (or --matrices)")
    if args.in_process:
        return in_process(sides, args)
    print(f"{'round':<6} {'build':<40} {'prefill tok/s':>14} {'decode tok/s':>13}")
    best: dict[str, list[float]] = {}
    ratios: list[tuple[float, float]] = []  # (prefill, decode) of each round's second side over its first
    for round_ in range(1, args.rounds + 1):
        this_round = []
        for name, tree, cflags in sides:
            figures = measure(tree, cflags, args)
            prefill, decode = figures["prefill_tok_s"], figures["decode_tok_s"]
            print(f"{round_:<6} {name:<40} {prefill:14.0f} {decode:13.1f}", flush=True)
            previous = best.get(name, [0.0, 0.0])
            best[name] = [max(previous[0], prefill), max(previous[1], decode)]
            this_round.append((prefill, decode))
        ratios.append((this_round[1][0] / this_round[0][0], this_round[1][1] / this_round[0][1]))
    (first, _, _), (second, _, _) = sides
    print(f"best of {args.rounds}: prefill {best[second][0] / best[first][0]:.2f}x, "
          f"decode {best[second][1] / best[first][1]:.2f}x ({second} over {first}); median of the rounds' "
          f"ratios: prefill {statistics.median(r[0] for r in ratios):.2f}x, "
          f"decode {statistics.median(r[1] for r in ratios):.2f}x")


if __name__ == "__main__":
    main()
