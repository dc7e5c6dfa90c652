"""A model larger than RAM: decode speed under a CPU budget against the disk's own read speed, same run.

    python benchmarks/bench_offload.py --workdir /data/q3n          # the full 80B-A3B layout at 4 bits (~46 GB)
    python benchmarks/bench_offload.py --workdir /tmp/q3n --layers 8 --cpu-mem 4G   # a quick, smaller check

The checkpoint is written straight in the quantized format (no 160 GB bf16 source): the real
config (48 layers, 512 experts of 512 top-10, the 151,936-token vocabulary, the MTP layer), random
codes with scales that keep activations bounded, random bf16 routers, the default policy's bits.
Random routers route almost uniformly: the worst case for a cache (no expert is hotter than
another), so the hit rate here is about the resident share and the figure is disk-bound.

Each round, in one process: drop the checkpoint's pages from the page cache, measure the disk's
read speed for expert blobs (8 reads in flight, random experts, pages dropped), then decode with
`qwen3next.load(folder, cpu_mem=...)` and report tok/s, the disk GB/s the decode achieved, and that
as a fraction of the measured ceiling. Check free space first (the full layout needs ~46 GB) and
delete the workdir afterwards (--delete does it).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from checkpoints import make_config  # noqa: E402
from tokenizer_fixture import QWEN_SPECIAL_TOKENS, write_tokenizer_files  # noqa: E402

from qwen3next.checkpoint_names import (PROJECTIONS, expert_layer_prefixes, expert_tensor_name,  # noqa: E402
                                        meta_model, packed_expert_name, quantized_names)
from qwen3next.config import Qwen3NextConfig  # noqa: E402
from qwen3next.offload.disk import BlobReader, drop_cached_pages  # noqa: E402
from qwen3next.quant import int4  # noqa: E402
from qwen3next.quant.layout import ALIGN, FORMAT_VERSION, ExpertLayout, array_specs  # noqa: E402
from qwen3next.quant.policy import Policy  # noqa: E402
from qwen3next.weights import encode_header, tensor_bytes, write_index  # noqa: E402

SHARD_BYTES = 4 * 2**30


def write_quantized(folder: Path, layers: int, bits: int, seed: int = 0) -> Path:
    """A random quantized folder of the real widths with `layers` layers (the MTP layer included)."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = write_tokenizer_files(folder)
    raw = make_config("real", 151936, tokens - len(QWEN_SPECIAL_TOKENS), num_hidden_layers=layers,
                      max_position_embeddings=262144)
    config = Qwen3NextConfig.from_dict(raw)
    policy = Policy(bits)
    model = meta_model(config, with_mtp=True)
    dense = []  # (name, dtype, shape, nbytes, fill)
    for name, t in model.state_dict().items():
        shape = tuple(t.shape)
        matrix_bits = policy.bits(name) if len(shape) == 2 else None
        if matrix_bits is None:
            dense.append((name, "BF16", shape, 2 * math.prod(shape), _kept(name, shape)))
            continue
        rows, cols = shape
        group = int4.group_for(cols, int4.DEFAULT_GROUP) if matrix_bits == 4 else cols
        for stored, (dtype, stored_shape, nbytes) in zip(quantized_names(name, matrix_bits),
                                                         array_specs(rows, cols, matrix_bits, group)):
            dense.append((stored, dtype, stored_shape, nbytes, _quantized(stored, dtype, stored_shape, cols, matrix_bits)))
    layouts = {}
    for prefix in expert_layer_prefixes(config, with_mtp=True).values():
        formats = {p: {"bits": policy.bits(expert_tensor_name(prefix, 0, p)), "group": int4.DEFAULT_GROUP}
                   for p in PROJECTIONS}
        layouts[prefix] = ExpertLayout.build(config.hidden_size, config.moe_intermediate_size, formats)
    raw["quantization"] = {"format": "qwen3next", "format_version": FORMAT_VERSION, "bits": bits,
                           "group_size": int4.DEFAULT_GROUP, **{k: v for k, v in policy.describe().items() if k != "bits"},
                           "experts": {prefix: layout.spec() for prefix, layout in layouts.items()}}
    experts = [(packed_expert_name(prefix, e), "U8", (layout.nbytes,), layout.nbytes, _blob(layout))
               for prefix, layout in layouts.items() for e in range(config.num_experts)]
    shards, current, size = [], [], 0
    for item in experts + dense:  # blobs first: each is a multiple of ALIGN, so they all stay aligned
        if current and size + item[3] > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += item[3]
    shards.append(current)
    weight_map = {}
    for i, items in enumerate(shards, start=1):
        path = folder / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        header, _ = encode_header([(n, d, s, b) for n, d, s, b, _ in items], {"format": "pt"}, align=ALIGN)
        with open(path, "wb") as f:
            f.write(header)
            for name, _, _, nbytes, fill in items:
                f.write(tensor_bytes(fill()))
                weight_map[name] = path.name
        print(f"wrote {path.name} ({sum(b for _, _, _, b, _ in items) / 1e9:.2f} GB)", file=sys.stderr)
    write_index(folder, weight_map, sum(b for s in shards for _, _, _, b, _ in s))
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    eos = [raw["eos_token_id"]]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "do_sample": False}))
    return folder


def _kept(name: str, shape: tuple[int, ...]):
    """Values a working model would hold: norms at their neutral scale, small random routers and convs."""
    if name.endswith("linear_attn.norm.weight") or name.endswith("dt_bias"):
        return lambda: torch.ones(shape, dtype=torch.bfloat16)
    if "norm" in name or name.endswith("A_log"):
        return lambda: torch.zeros(shape, dtype=torch.bfloat16)
    std = 2 * shape[-1] ** -0.5 if len(shape) == 2 else 0.5
    return lambda: (torch.randn(shape) * std).to(torch.bfloat16)


def _quantized(name: str, dtype: str, shape: tuple[int, ...], cols: int, bits: int):
    """Random codes; scales (and minimums) chosen so a matrix keeps its input's scale roughly."""
    step = 1.0 / (math.sqrt(cols) * (127 if bits == 8 else 7.5))
    if name.endswith((".q4", ".q8")):
        return lambda: torch.randint(0, 256, shape, dtype=torch.uint8)
    if name.endswith(".min"):
        return lambda: torch.full(shape, -7.5 * step, dtype=torch.float16)
    return lambda: torch.full(shape, step, dtype=torch.float32 if dtype == "F32" else torch.float16)


def _blob(layout: ExpertLayout):
    """One expert blob: random codes, every projection's scales and minimums as in _quantized."""
    def fill() -> torch.Tensor:
        blob = torch.randint(0, 256, (layout.nbytes,), dtype=torch.uint8)
        for p in layout.projections.values():
            step = 1.0 / (math.sqrt(p.cols) * (127 if p.bits == 8 else 7.5))
            specs = array_specs(p.rows, p.cols, p.bits, p.group)
            for (dtype, _, nbytes), offset, value in zip(specs[1:], p.offsets[1:], (step, -7.5 * step)):
                kind = torch.float32 if dtype == "F32" else torch.float16
                blob[offset:offset + nbytes] = torch.full((nbytes // kind.itemsize,), value, dtype=kind).view(torch.uint8)
        return blob
    return fill


def disk_read_speed(folder: Path, samples: int = 256) -> float:
    """GB/s of random expert-blob reads, 8 in flight, into reused buffers, pages dropped first."""
    from qwen3next.weights import CheckpointReader

    reader = CheckpointReader(folder)
    blobs = [n for n in reader.names() if n.endswith(".packed")]
    ranges = [reader.byte_range(n) for n in random.Random(1).sample(blobs, min(samples, len(blobs)))]
    for shard in folder.glob("*.safetensors"):
        drop_cached_pages(shard)
    reads = BlobReader()
    buffers = [torch.empty(max(r[2] for r in ranges), dtype=torch.uint8) for _ in range(16)]
    started = time.perf_counter()
    pending = [reads.submit(path, offset, length, buffers[i % 16], "expert") for i, (path, offset, length)
               in enumerate(ranges)]
    for future in pending:
        future.result()
    seconds = time.perf_counter() - started
    reads.close()
    return sum(r[2] for r in ranges) / seconds / 1e9


def decode(folder: Path, cpu_mem: str, tokens: int, policy: str) -> dict:
    import qwen3next

    for shard in folder.glob("*.safetensors"):
        drop_cached_pages(shard)
    started = time.perf_counter()
    engine = qwen3next.load(folder, cpu_mem=cpu_mem, max_context=4096, expert_policy=policy, router_stats=False,
                            quiet=True)
    load_seconds = time.perf_counter() - started
    engine.eos_ids = []
    prompt = list(range(1000, 1016))
    result = engine.complete(qwen3next.Request(prompt=prompt, max_new_tokens=tokens, temperature=0))
    e = result.experts or {}
    decode_seconds = result.timings.decode_seconds
    return {"plan": engine.plan.summary(), "load_seconds": load_seconds,
            "prefill_seconds": result.timings.prefill_seconds, "decode_tok_s": result.timings.decode_tokens_per_second,
            "hit_rate": e.get("hit_rate"), "disk_bytes_per_token": e.get("disk_bytes_per_token"),
            "disk_gb_s": e.get("disk_bytes", 0) / max(decode_seconds + result.timings.prefill_seconds, 1e-9) / 1e9,
            "stall_seconds": e.get("stall_seconds"),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="where the checkpoint is written (outside the repo)")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8))
    parser.add_argument("--cpu-mem", default="12G")
    parser.add_argument("--tokens", type=int, default=16, help="tokens to decode")
    parser.add_argument("--policy", default="stats", choices=("lru", "lfu", "stats"))
    parser.add_argument("--delete", action="store_true", help="delete the checkpoint afterwards")
    args = parser.parse_args()
    folder = args.workdir / f"q{args.bits}-{args.layers}layers"
    if not (folder / "config.json").exists():
        free = shutil.disk_usage(args.workdir.parent if not args.workdir.exists() else args.workdir).free
        print(f"writing {folder} ({free / 1e9:.0f} GB free)", file=sys.stderr)
        started = time.perf_counter()
        write_quantized(folder.with_suffix(".partial"), args.layers, args.bits).rename(folder)
        print(f"written in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    try:
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        ceiling = disk_read_speed(folder)
        figures = decode(folder, args.cpu_mem, args.tokens, args.policy)
        print(json.dumps({"checkpoint_gb": size / 1e9, "disk_read_gb_s": ceiling, **figures,
                          "fraction_of_io_ceiling": figures["disk_gb_s"] / ceiling}, indent=2))
    finally:
        if args.delete:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
