"""What a `run` with given placement flags would get, and how fast it would decode, without reading a weight.

`plan_folder` builds the memory plan as `load()` does, from config.json and the shard headers (the same
checks, then offload/placement's planner), so `qwen3next inspect --plan` shows the plan `run` gets.
`calibrate` measures, once per disk and CPU, what a prediction needs: the disk's random read speed for
this folder's experts, and the speed at which the decode kernels stream resident experts of its layout
from RAM (cached as JSON under the user cache). `predict` turns the two into decode tokens per second:
a CPU decode step is bound by the bytes it moves, the always-active weights and the chosen experts from
RAM, and first, from disk, the chosen experts the slots do not hold.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from qwen3next import cpu_kernels
from qwen3next.checkpoint_names import MTP_PREFIX, expert_layer_prefixes, has_mtp, meta_model
from qwen3next.config import Qwen3NextConfig
from qwen3next.engine import device_from_flag
from qwen3next.inspection import Report, Section
from qwen3next.loader import check_and_plan, resolve_dtype
from qwen3next.model_path import resolve_model_path, user_cache
from qwen3next.weights import CheckpointReader

from .budget import ExpertPlan, format_size
from .cached_experts import ExpertCompute
from .disk import READ_THREADS, BlobReader, drop_cached_pages
from .expert_cache import LayerSource
from .placement import (Placement, dense_bytes, resolve_device)
from .router_stats import RouterStatistics

DISK_SECONDS = 1.5  # the disk probe's time limit (it stops earlier after `samples` experts)
KERNEL_SECONDS = 0.75  # the kernel probe's
KERNEL_WINDOWS = 5  # it reports its best window of KERNEL_SECONDS / KERNEL_WINDOWS
KERNEL_ARENA_BYTES = 256 * 2**20  # far beyond the CPU caches, so the probe's experts come from RAM as in decode
CALIBRATION_VERSION = 1
EMBEDDING = "model.embed_tokens.weight"


@dataclass(frozen=True)
class FolderPlan:
    """A folder's placement under a Placement, as load() would build it, and what a decode step reads."""

    folder: Path
    config: Qwen3NextConfig
    device: torch.device
    dtype: torch.dtype
    plan: ExpertPlan | None  # None: loaded whole, unplanned (a bf16 folder that fits, with no budget given)
    whole_bytes: int  # the checkpoint's tensor bytes
    prefixes: dict[int, str]  # store layer -> checkpoint prefix of every MoE layer (the MTP layer's included)
    sources: dict[int, LayerSource]  # where each layer's experts are on disk, as the expert cache reads them
    compute: ExpertCompute  # how they compute from a slot, as the expert cache's store runs them
    dense_read_bytes: int  # always-active bytes one decoded token reads

    @property
    def decode_layers(self) -> tuple[int, ...]:
        """The MoE layers a decoded token routes through: the MTP layer only drafts, and decode does not draft."""
        return tuple(layer for layer in self.prefixes if layer < self.config.num_hidden_layers)

    @property
    def probe_layer(self) -> int:
        """The decode layer the calibration measures: the one with the largest experts."""
        return max(self.decode_layers, key=lambda layer: self.sources[layer].nbytes)


def plan_folder(path: str | os.PathLike | None, placement: Placement, dtype: str | torch.dtype = "bfloat16",
                quiet: bool = True) -> FolderPlan:
    """The plan `load(path, dtype=dtype, **placement)` builds, from config.json and the shard headers alone.

    Raises what load() raises for the same inputs, in the same order (a bad size, a GPU budget without a
    GPU, a checkpoint that does not match its config, a budget below the always-active weights)."""
    dtype = resolve_dtype(dtype)
    folder = resolve_model_path(path)
    device = resolve_device(placement, None) or device_from_flag(None)  # load()'s rule for device=None
    config = Qwen3NextConfig.from_file(folder)
    with CheckpointReader(folder) as reader:
        with_mtp = has_mtp(reader.names())
        model = meta_model(config, with_mtp)
        prefixes = expert_layer_prefixes(config, with_mtp)
        dense_names = list(model.state_dict())
        plan, sources, compute = check_and_plan(placement, reader, model, prefixes, dense_names, dtype, with_mtp, quiet)
        read = decode_read_bytes(reader, config, dense_names, dtype)
        whole = reader.total_bytes()
    return FolderPlan(folder, config, device, dtype, plan, whole, prefixes, sources, compute, read)


def decode_read_bytes(reader: CheckpointReader, config: Qwen3NextConfig, dense_names: list[str],
                      dtype: torch.dtype) -> int:
    """Always-active bytes one decoded token reads: every main-model tensor once as loaded, but one row of the
    embedding table (unless lm_head is tied to it: then the table is the output projection, read whole).
    The MTP head is left out: it only drafts tokens, and decode does not draft."""
    total = 0
    for name in dense_names:
        if name.startswith(MTP_PREFIX):
            continue
        loaded = dense_bytes(reader, [name], dtype)
        total += loaded // config.vocab_size if name == EMBEDDING and not config.tie_word_embeddings else loaded
    return total


# --- calibration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """Measured speeds, bytes per second; `measured` is when (ISO time), `cached` whether it came from the file."""

    disk_bytes_per_second: float
    ram_bytes_per_second: float
    measured: str
    cached: bool = False


def calibration_file() -> Path:
    """The calibration cache: $QWEN3NEXT_CACHE/calibration.json, else ~/.cache/qwen3next/calibration.json."""
    return user_cache() / "calibration.json"


def calibration_key(fplan: FolderPlan) -> str:
    """What the figures depend on: the disk the experts are on (st_dev), the CPU (the kernels' own signature,
    their build and the threads they run on), and the experts' format, which the kernels stream."""
    layer = fplan.probe_layer
    source = fplan.sources[layer]
    formats = (fplan.config.quantization or {}).get("experts") or {}
    parts = {"st_dev": os.stat(source.pieces[0][0][0]).st_dev, "cpu": cpu_kernels.cpu_signature(),
             "threads": torch.get_num_threads(), "kernels": cpu_kernels.prepare(quiet=True).describe(),
             "compute": type(fplan.compute).__name__, "dtype": str(fplan.dtype),
             "format": formats.get(fplan.prefixes[layer]), "slot": [source.nbytes, list(source.offsets)],
             "top_k": fplan.config.num_experts_per_tok, "hidden": fplan.config.hidden_size}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def measure_speeds(fplan: FolderPlan) -> tuple[float, float]:
    """(disk, RAM) bytes per second for this folder, measured now (about DISK_SECONDS + KERNEL_SECONDS)."""
    return disk_read_speed(fplan.sources, burst=fplan.config.num_experts_per_tok), kernel_read_speed(fplan)


def calibrate(fplan: FolderPlan, recalibrate: bool = False, quiet: bool = True) -> Calibration:
    """The cached figures for this folder's disk, CPU and layout, else (or with `recalibrate`) measured now and
    saved. A cache that cannot be written costs a measurement next time, nothing else (said on stderr)."""
    key, path = calibration_key(fplan), calibration_file()
    entries = _read_entries(path)
    if not recalibrate and key in entries:
        return Calibration(**entries[key], cached=True)
    if not quiet:
        print("qwen3next: calibrating: the disk's and the kernels' read speeds here (a few seconds, once)",
              file=sys.stderr)
    disk, ram = measure_speeds(fplan)
    found = Calibration(disk, ram, time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    entries[key] = {k: v for k, v in asdict(found).items() if k != "cached"}
    _write_entries(path, entries)
    return found


def _read_entries(path: Path) -> dict[str, dict]:
    """The cache file's usable entries; a missing, unreadable or foreign file is an empty cache (it is only a
    cache: what is not usable is measured again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) and data.get("version") == CALIBRATION_VERSION else None
    return {key: entry for key, entry in entries.items() if _usable(entry)} if isinstance(entries, dict) else {}


def _usable(entry) -> bool:
    speeds = ("disk_bytes_per_second", "ram_bytes_per_second")
    return isinstance(entry, dict) and set(entry) == {*speeds, "measured"} and isinstance(entry["measured"], str) \
        and all(type(entry[name]) in (int, float) and entry[name] > 0 for name in speeds)


def _write_entries(path: Path, entries: dict[str, dict]) -> None:
    """Written to a temporary name and renamed over the file, so a concurrent reader sees one whole version."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp.write_text(json.dumps({"version": CALIBRATION_VERSION, "entries": entries}, indent=1), encoding="utf-8")
        os.replace(temp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        print(f"qwen3next: calibration cache {path}: cannot save ({exc.strerror or exc}); measured again next time",
              file=sys.stderr)


def disk_read_speed(sources: dict[int, LayerSource], samples: int = 256, seconds: float = DISK_SECONDS,
                    burst: int | None = None) -> float:
    """Bytes/s of reads of random experts through the cache's reader (READ_THREADS in flight, pages dropped
    after each read), each expert's pieces into one reused slot buffer, after dropping the files' pages so
    the figure is the disk's and not the page cache's. Stops after `samples` experts or `seconds`.

    burst None keeps the queue full (the disk's ceiling, what benchmarks compare against); burst k reads
    k experts at a time and waits for all of them, as a decode step's layer waits for its misses."""
    experts = [pieces for source in sources.values() for pieces in source.pieces]
    chosen = random.Random(1).sample(experts, k=min(samples, len(experts)))
    for path in {path for pieces in chosen for path, _, _ in pieces}:
        drop_cached_pages(path)
    window = burst or 2 * READ_THREADS
    slots = torch.empty(window, max(sum(length for _, _, length in pieces) for pieces in chosen), dtype=torch.uint8)
    reads, pending, waited = BlobReader(), [], 0
    started = time.perf_counter()
    try:
        for i, pieces in enumerate(chosen):
            if i >= window and (burst is None or i % burst == 0):
                upto = i if burst else i - window + 1  # a whole burst; or the expert whose slot comes next
                _wait(pending[waited:upto])
                waited = upto
                if time.perf_counter() - started > seconds:
                    break
            pending.append(_submit(reads, pieces, slots[i % window]))
        _wait(pending[waited:])
        elapsed = time.perf_counter() - started
    finally:
        reads.close()
    return sum(length for pieces in chosen[: len(pending)] for _, _, length in pieces) / elapsed


def _submit(reads: BlobReader, pieces: tuple, slot: torch.Tensor) -> list:
    """Start reading one expert's pieces end to end into `slot`, as the expert cache lays them out."""
    futures, start = [], 0
    for path, offset, length in pieces:
        futures.append(reads.submit(path, offset, length, slot[start : start + length], "expert"))
        start += length
    return futures


def _wait(experts: list[list]) -> None:
    """Wait for every read of these experts (a failed read raises here, naming its file)."""
    for futures in experts:
        for future in futures:
            future.result()


def kernel_read_speed(fplan: FolderPlan, seconds: float = KERNEL_SECONDS, arena_bytes: int = KERNEL_ARENA_BYTES,
                      windows: int = KERNEL_WINDOWS) -> float:
    """Bytes/s at which decode computes resident experts of the folder's format: one call per token-layer over
    top_k slots (the CPU kernel where it runs, else the store's per-expert path), each call on slots the previous
    calls did not touch, so they come from RAM as in decode, where a layer's experts were read a whole step ago.

    The best of `windows` equal windows: on a shared machine another process can stall the kernel's threads
    for a while, and the figure is this machine's speed, not that moment's."""
    layer, top_k = fplan.probe_layer, fplan.config.num_experts_per_tok
    source = fplan.sources[layer]
    count = max(2 * top_k, arena_bytes // source.nbytes)
    arena = torch.full((count, source.nbytes), 0x11, dtype=torch.uint8)  # pages written; 0x1111: a normal fp16/bf16
    x = torch.randn(fplan.config.hidden_size).to(fplan.dtype)
    weights = torch.full((top_k,), 1 / top_k)
    best, calls = 0.0, 0
    with torch.inference_mode():  # as decode runs (the kernels refuse autograd)
        step = _token_step(fplan.compute, layer, source, arena, x, weights)
        step(torch.arange(top_k))  # warm: the first call pays for thread start-up
        for _ in range(windows):
            done, started = calls, time.perf_counter()
            while time.perf_counter() - started < seconds / windows:
                step((torch.arange(top_k) + calls * top_k) % count)
                calls += 1
            best = max(best, (calls - done) * top_k * source.nbytes / (time.perf_counter() - started))
    return best


def _token_step(compute: ExpertCompute, layer: int, source: LayerSource, arena: torch.Tensor, x: torch.Tensor,
                weights: torch.Tensor) -> Callable:
    """One token-layer's experts `ids` over arena slots, as offload/cached_experts runs them: the format's token
    kernel on an address table laid out as the expert cache's (slot start + piece offsets), else per expert."""
    kernel = compute.token_kernel(layer)
    if kernel is not None and cpu_kernels.usable(x):
        starts = arena.data_ptr() + torch.arange(arena.shape[0], dtype=torch.int64)[:, None] * arena.shape[1]
        table = (starts + torch.tensor(source.offsets, dtype=torch.int64)).contiguous()
        return lambda ids: kernel(x, table, ids, weights)
    return lambda ids: [compute.run_expert(layer, arena[e], x[None]) for e in ids.tolist()]


# --- prediction -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """Decode speed from bytes moved per token: RAM bytes at the kernels' speed, missed experts at the disk's."""

    tokens_per_second: float
    hit_rate: float  # of a token's expert lookups, the share the slots serve
    hit_rate_from: str  # "router statistics" or "uniform routing"
    statistics_tokens: int  # tokens the router statistics counted (0: none)
    ram_bytes: int  # per token: always-active weights read plus every chosen expert
    disk_bytes: int  # per token: the chosen experts the slots do not hold


def hit_rate(slots: int, layers: tuple[int, ...], experts: int, top_k: int,
             statistics: RouterStatistics | None) -> tuple[float, int]:
    """The long-run share of a token's expert lookups the slots serve, and the statistics' token count used.

    Eviction is global, so in the long run the slots hold the experts most likely to be chosen across all
    decode layers: an expert's chance per token is its layer's count over its tokens in the router statistics,
    or top_k/experts (uniform routing) in layers they have not counted. The rate is the chance held by the
    `slots` likeliest, over the top_k * layers lookups a token makes; uniform routing gives slots / experts."""
    chance = torch.full((len(layers), experts), top_k / experts, dtype=torch.float64)
    counted = 0
    if statistics is not None:
        tokens = statistics.tokens
        for row, layer in enumerate(layers):
            if tokens[layer] > 0:
                chance[row] = statistics.counts[layer].double() / tokens[layer]
                counted = max(counted, int(tokens[layer]))
    held = chance.flatten().topk(min(slots, chance.numel())).values.sum()
    return min(1.0, float(held) / (len(layers) * top_k)), counted


def predict(fplan: FolderPlan, calibration: Calibration, statistics: RouterStatistics | None = None) -> Prediction:
    """Seconds per token = (always-active bytes read + every chosen expert) / RAM speed + missed experts / disk
    speed. A miss is read first and then computed from its slot (acquire waits for it), so it costs both.
    Leaves out the KV cache read (short contexts), the recurrent states and per-call dispatch.
    Needs a plan: a folder loaded whole, unplanned (fplan.plan None), has none."""
    plan, layers, top_k = fplan.plan, fplan.decode_layers, fplan.config.num_experts_per_tok
    rate, counted = hit_rate(plan.slots, layers, fplan.config.num_experts, top_k, statistics)
    chosen = len(layers) * top_k * plan.slot_bytes
    ram, disk = fplan.dense_read_bytes + chosen, round((1 - rate) * chosen)
    seconds = ram / calibration.ram_bytes_per_second + disk / calibration.disk_bytes_per_second
    return Prediction(1 / seconds, rate, "router statistics" if counted else "uniform routing", counted, ram, disk)


# --- the report (`qwen3next inspect --plan`) --------------------------------------------------


def report(path: str | os.PathLike | None, placement: Placement, dtype: str | torch.dtype = "bfloat16",
           recalibrate: bool = False, quiet: bool = True) -> Report:
    """The plan, the slots per layer and the predicted decode speed of `path` under `placement`, as sections."""
    fplan = plan_folder(path, placement, dtype, quiet)
    calibration = prediction = None
    reason = _unpredicted(fplan)
    if reason is None:
        calibration = calibrate(fplan, recalibrate, quiet)
        prediction = predict(fplan, calibration, RouterStatistics.for_model(fplan.folder, fplan.config))
    return Report(fplan.folder, [_plan_section(fplan, placement), _slots_section(fplan),
                                 _forecast_section(fplan, prediction, calibration, reason)])


def _unpredicted(fplan: FolderPlan) -> str | None:
    """Why there is no prediction for this plan, or None: the calibration measures the CPU decode path."""
    if fplan.plan is None:
        return "loaded whole with no budget, unplanned: give --cpu-mem for a plan and a prediction"
    if fplan.device.type != "cpu":
        return f"the run would compute on {fplan.device}; predictions cover the CPU (--gpu-mem 0 for that run)"
    return None


def _plan_section(fplan: FolderPlan, placement: Placement) -> Section:
    plan, dtype = fplan.plan, str(fplan.dtype).removeprefix("torch.")
    compute = ("compute", f"{fplan.device.type}, {dtype}", "")
    if plan is None:
        data = {"device": fplan.device.type, "dtype": dtype, "loads_whole": True, "bytes": fplan.whole_bytes}
        return Section("plan", "memory plan", data, [
            compute, ("whole folder", format_size(fplan.whole_bytes), "unquantized, no budget given: loads whole")])
    slots, experts = plan.slots, plan.experts
    on_disk = experts - slots
    data = {"device": fplan.device.type, "dtype": dtype, "loads_whole": False, **asdict(plan),
            "budget_from": "--cpu-mem" if placement.cpu_mem is not None else "free memory",
            "slots_bytes": slots * plan.slot_bytes, "resident_share": slots / experts, "on_disk_experts": on_disk,
            "on_disk_bytes": on_disk * plan.slot_bytes, "fully_resident": plan.fully_resident}
    rows = [
        compute,
        ("budget", format_size(plan.budget), "--cpu-mem" if placement.cpu_mem is not None else
         "default: the memory free now, less 10% and the runtime's own"),
        ("always-active weights", format_size(plan.always_active),
         "resident: embeddings, attention, DeltaNet, norms, routers, shared experts, lm_head, MTP"),
        ("context state", format_size(plan.context_state),
         f"KV cache for {plan.max_context} tokens + recurrent states"),
        *([("prefill memory", format_size(plan.prefill_state), f"working memory of {plan.prefill_tokens}-token "
            "prefill chunks (experts come from disk)")] if plan.prefill_state else []),
        ("expert slots", format_size(slots * plan.slot_bytes),
         f"{slots} slots of {format_size(plan.slot_bytes)}: {slots / experts:.0%} of {experts} experts"),
        ("on disk", format_size(on_disk * plan.slot_bytes),
         f"{on_disk} experts, read when routed" if on_disk else "none: every expert resident, nothing read again"),
    ]
    return Section("plan", "memory plan", data, rows)


def _slots_section(fplan: FolderPlan) -> Section:
    layers, decode, experts = len(fplan.prefixes), len(fplan.decode_layers), fplan.config.num_experts
    if fplan.plan is None:
        return Section("slots", "expert slots per layer", None, [("slots", "-", "none: the folder loads whole")])
    slots = fplan.plan.slots
    data = {"layers": layers, "decode_layers": decode, "experts_per_layer": experts, "slots": slots,
            "scope": "shared", "average_per_layer": slots / layers}
    mtp = f" ({decode} routed at decode, {layers - decode} MTP)" if layers > decode else ""
    rows = [
        ("slots", str(slots), f"shared across {layers} layers{mtp}: eviction is global, so a layer with more "
                              "experts in use holds more"),
        ("average per layer", f"{slots / layers:.1f}", f"of {experts} experts each"),
    ]
    return Section("slots", "expert slots per layer", data, rows)


def _forecast_section(fplan: FolderPlan, prediction: Prediction | None, calibration: Calibration | None,
                      reason: str | None) -> Section:
    if prediction is None:
        return Section("forecast", "predicted decode speed", {"tokens_per_second": None, "reason": reason},
                       [("decode", "-", reason)])
    p, c = prediction, calibration
    experts = len(fplan.decode_layers) * fplan.config.num_experts_per_tok
    data = {"tokens_per_second": p.tokens_per_second, "hit_rate": p.hit_rate, "hit_rate_from": p.hit_rate_from,
            "statistics_tokens": p.statistics_tokens, "ram_bytes_per_token": p.ram_bytes,
            "disk_bytes_per_token": p.disk_bytes, "ram_bytes_per_second": c.ram_bytes_per_second,
            "disk_bytes_per_second": c.disk_bytes_per_second,
            "calibration": {"measured": c.measured, "cached": c.cached, "file": str(calibration_file())}}
    source = f"router statistics ({p.statistics_tokens:,} tokens counted)" if p.statistics_tokens else \
        "uniform routing (no router statistics for this model yet)"
    rows = [
        ("decode", f"{p.tokens_per_second:.2f} tok/s", "one token at a time on the CPU, short context, prefetch off"),
        ("expert hit rate", f"{p.hit_rate:.0%}", source),
        ("from RAM", f"{p.ram_bytes / 1e6:.1f} MB/token", f"at {c.ram_bytes_per_second / 1e9:.1f} GB/s: always-active "
                                                          f"weights read and {experts} chosen experts"),
        ("from disk", f"{p.disk_bytes / 1e6:.1f} MB/token",
         f"at {c.disk_bytes_per_second / 1e9:.2f} GB/s: the chosen experts the slots miss"),
        ("calibration", c.measured, ("cached in " if c.cached else "measured now, saved in ") + str(calibration_file())
         + " (--recalibrate measures again)"),
    ]
    return Section("forecast", "predicted decode speed", data, rows)
