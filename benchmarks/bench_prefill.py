"""Time to first token under a CPU budget: prefill chunks against passes over the experts on disk.

    python benchmarks/bench_prefill.py --workdir /data/q3n --prompts 512,4096            # the full 80B-A3B layout
    python benchmarks/bench_prefill.py --workdir /tmp/q3n --layers 8 --cpu-mem 3G --chunks 512,4096

Under a budget that holds a fraction of the experts, a prefill chunk of 512 tokens already routes to
nearly every expert of every layer (5,120 choices over 512 experts), so every chunk is one pass over
the experts on disk. The engine's default chunk under offload is OFFLOAD_PREFILL_CHUNK (4096): a
4096-token prompt costs one pass instead of eight. Each measurement runs in its own process (its
peak RSS is its own) on a freshly loaded engine with the checkpoint's pages dropped first, and
reports the prefill time (time to first token), the bytes read from disk and what that is in passes
over all the routed experts. The checkpoint is bench_offload.py's (written if missing, same folder).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from checkpoints import write_quantized_model  # noqa: E402


def measure(folder: str, cpu_mem: str, prompt_tokens: int, chunk: int | None, out) -> None:
    """One time-to-first-token measurement in this (fresh) process; puts a dict on `out`."""
    import qwen3next
    from qwen3next.offload.disk import drop_cached_pages

    for shard in Path(folder).glob("*.safetensors"):
        drop_cached_pages(shard)
    engine = qwen3next.load(folder, cpu_mem=cpu_mem, max_context=prompt_tokens + 16, router_stats=False, quiet=True)
    cache = engine.expert_store.cache
    expert_bytes = sum(source.nbytes * len(source.pieces) for source in cache.sources.values())
    loaded = cache.counters.disk_bytes
    prompt = [1000 + (7 * i) % 50000 for i in range(prompt_tokens)]
    started = time.perf_counter()
    result = engine.complete(qwen3next.Request(prompt=prompt, max_new_tokens=1, temperature=0, prefill_chunk=chunk))
    seconds = time.perf_counter() - started
    read = cache.counters.disk_bytes - loaded
    out.put({"prompt_tokens": prompt_tokens, "chunk": chunk or engine.prefill_chunk,
             "time_to_first_token_s": round(seconds, 2), "prefill_tok_s": round(prompt_tokens / seconds, 1),
             "disk_gb": round(read / 1e9, 2), "disk_gb_s": round(read / seconds / 1e9, 3),
             "passes_over_the_experts": round(read / expert_bytes, 2), "slots": cache.slot_count,
             "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
             "first_token": result.tokens[0]})
    engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="where the checkpoint is (written outside the repo)")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--cpu-mem", default="12G")
    parser.add_argument("--prompts", default="512,4096", help="prompt lengths, comma-separated")
    parser.add_argument("--chunks", default="default",
                        help="prefill chunks to compare, comma-separated ('default': the engine's choice)")
    parser.add_argument("--delete", action="store_true", help="delete the checkpoint afterwards")
    args = parser.parse_args()
    folder = args.workdir / f"q4-{args.layers}layers"
    if not (folder / "config.json").exists():
        print(f"writing {folder} ({shutil.disk_usage(args.workdir.parent).free / 1e9:.0f} GB free)", file=sys.stderr)
        write_quantized_model(folder.with_suffix(".partial"), args.layers, 4).rename(folder)
    context = multiprocessing.get_context("spawn")
    try:
        for prompt_tokens in (int(n) for n in args.prompts.split(",")):
            for chunk in (None if c == "default" else int(c) for c in args.chunks.split(",")):
                out = context.Queue()
                worker = context.Process(target=measure, args=(str(folder), args.cpu_mem, prompt_tokens, chunk, out))
                worker.start()
                figures = out.get()
                worker.join()
                print(json.dumps({"layers": args.layers, "cpu_mem": args.cpu_mem, **figures}), flush=True)
    finally:
        if args.delete:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
