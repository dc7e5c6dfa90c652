"""A model larger than RAM: decode speed under a CPU budget against the disk's own read speed, same run.

    python benchmarks/bench_offload.py --workdir /data/q3n          # the full 80B-A3B layout at 4 bits (~46 GB)
    python benchmarks/bench_offload.py --workdir /tmp/q3n --layers 8 --cpu-mem 4G   # a quick, smaller check

The checkpoint is written straight in the quantized format (no 160 GB bf16 source): the real
config (48 layers, 512 experts of 512 top-10, the 151,936-token vocabulary, the MTP layer), random
codes with scales that keep activations bounded, random bf16 routers, the default policy's bits.
Random routers route almost uniformly: the worst case for a cache (no expert is hotter than
another), so the hit rate here is about the resident share and the figure is disk-bound.

Each round, in one process: drop the checkpoint's pages from the page cache, measure the disk's
read speed for expert blobs (8 reads in flight, random experts, pages dropped; offload/forecast.py),
calibrate and predict the decode speed as `qwen3next inspect FOLDER --plan --cpu-mem SIZE` does, then
decode with `qwen3next.load(folder, cpu_mem=...)` and report tok/s against the prediction, the disk
GB/s the decode achieved, and that as a fraction of the measured ceiling. Check free space first
(the full layout needs ~46 GB) and delete the workdir afterwards (--delete does it).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from checkpoints import write_quantized_model  # noqa: E402

from qwen3next.offload import forecast  # noqa: E402
from qwen3next.offload.disk import drop_cached_pages  # noqa: E402
from qwen3next.offload.placement import Placement  # noqa: E402


def decode(folder: Path, cpu_mem: str, tokens: int, policy: str, prefetch: bool) -> dict:
    import qwen3next

    for shard in folder.glob("*.safetensors"):
        drop_cached_pages(shard)
    started = time.perf_counter()
    engine = qwen3next.load(folder, cpu_mem=cpu_mem, max_context=4096, expert_policy=policy, router_stats=False,
                            quiet=True, prefetch=prefetch)
    load_seconds = time.perf_counter() - started
    engine.eos_ids = []
    prompt = list(range(1000, 1016))
    result = engine.complete(qwen3next.Request(prompt=prompt, max_new_tokens=tokens, temperature=0))
    e = result.experts or {}
    decode_seconds = result.timings.decode_seconds
    plan = engine.plan.summary()
    engine.close()
    return {"plan": plan, "load_seconds": load_seconds,
            "prefill_seconds": result.timings.prefill_seconds, "decode_tok_s": result.timings.decode_tokens_per_second,
            "hit_rate": e.get("hit_rate"), "disk_bytes_per_token": e.get("disk_bytes_per_token"),
            "disk_gb_s": e.get("disk_bytes", 0) / max(decode_seconds + result.timings.prefill_seconds, 1e-9) / 1e9,
            "stall_seconds": e.get("stall_seconds"),
            "peak_rss_gib (the process's, so of every run so far)": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="where the checkpoint is written (outside the repo)")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8))
    parser.add_argument("--cpu-mem", default="12G")
    parser.add_argument("--tokens", type=int, default=16, help="tokens to decode")
    parser.add_argument("--policy", default="stats", choices=("lru", "lfu", "stats"))
    parser.add_argument("--prefetch", choices=("on", "off", "both"), default="on",
                        help="with both, one decode with prefetch and one without, alternating")
    parser.add_argument("--delete", action="store_true", help="delete the checkpoint afterwards")
    args = parser.parse_args()
    folder = args.workdir / f"q{args.bits}-{args.layers}layers"
    if not (folder / "config.json").exists():
        free = shutil.disk_usage(args.workdir.parent if not args.workdir.exists() else args.workdir).free
        print(f"writing {folder} ({free / 1e9:.0f} GB free)", file=sys.stderr)
        started = time.perf_counter()
        write_quantized_model(folder.with_suffix(".partial"), args.layers, args.bits).rename(folder)
        print(f"written in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    try:
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        for prefetch in {"on": [True], "off": [False], "both": [True, False]}[args.prefetch]:
            fplan = forecast.plan_folder(folder, Placement(cpu_mem=args.cpu_mem, max_context=4096))
            ceiling = forecast.disk_read_speed(fplan.sources) / 1e9
            expected = forecast.predict(fplan, forecast.calibrate(fplan, recalibrate=True)).tokens_per_second
            figures = decode(folder, args.cpu_mem, args.tokens, args.policy, prefetch)
            print(json.dumps({"checkpoint_gb": size / 1e9, "prefetch": prefetch, "disk_read_gb_s": ceiling,
                              "predicted_decode_tok_s": expected, **figures,
                              "fraction_of_io_ceiling": figures["disk_gb_s"] / ceiling}, indent=2))
    finally:
        if args.delete:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
