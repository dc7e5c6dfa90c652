"""The one-line speed and memory report behind --stats."""

from __future__ import annotations

import resource
import sys

import torch

from qwen3next.engine import Engine
from qwen3next.request import Result


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: GPU allocations on CUDA, resident set size otherwise."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def format_stats(result: Result, engine: Engine) -> str:
    usage, timings, device = result.usage, result.timings, engine.device
    line = (
        f"prompt: {usage.prompt_tokens} tokens, prefill {timings.prefill_tokens_per_second(usage.prefilled_tokens):.1f} tok/s | "
        f"generated: {usage.completion_tokens} tokens, decode {timings.decode_tokens_per_second:.1f} tok/s | "
        f"finish: {result.finish_reason} | peak memory ({device.type}): {peak_memory_bytes(device) / 2**20:.0f} MiB | "
        f"compute: {engine.compute}"
    )
    if timings.verify_steps:
        by_position = " ".join(f"{a / d:.0%}" for a, d in zip(timings.accepted_by_position, timings.drafted_by_position))
        line += (f"\nspeculative: {timings.drafted} drafted, {timings.accepted} accepted "
                 f"({timings.accepted / max(timings.drafted, 1):.0%}; by draft position {by_position or '-'}) | "
                 f"{timings.decode_steps / timings.verify_steps:.2f} tokens per verify step")
    if result.experts is not None:
        e = result.experts
        line += (f"\nexperts: RAM hit rate {e['hit_rate']:.1%} ({e['hits']} hits, {e['misses']} misses) | disk "
                 f"{e['disk_bytes'] / 2**20:.1f} MiB, {e['disk_bytes_per_token'] / 2**20:.2f} MiB/token | prefetch "
                 f"precision {e['prefetch_precision']:.1%}, recall {e['prefetch_recall']:.1%} | I/O stall "
                 f"{e['stall_seconds']:.2f} s")
    return line


def stats_object(result: Result, engine: Engine) -> dict:
    """--stats-json: the request's result less its text, with the compute path, peak memory and the memory plan."""
    out = {k: v for k, v in result.as_dict().items() if k not in ("text", "tokens")}
    out.update(compute=engine.compute, device=engine.device.type, peak_memory_bytes=peak_memory_bytes(engine.device),
               memory_plan=None if engine.plan is None else engine.plan.summary())
    return out
