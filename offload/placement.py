"""Placement: how `load()` splits a model over the memory it may use, and the store that results.

`Placement` is the one options object for where weights go (`load(..., cpu_mem=, gpu_mem=,
max_context=, expert_policy=)` and the `--cpu-mem`, `--gpu-mem`, `--max-context`, `--expert-policy`
flags build it). The always-active weights go to the compute device; under a CPU budget the
routed experts get the RAM slots the rest of the budget pays for, and the checkpoint itself is the
disk tier (nothing is copied): a quantized folder's expert is one blob, a bf16 folder's three
matrices. When every expert fits, every expert gets a slot at load (quantized) or the experts load
as stacked tensors (bf16), and nothing is read again: the fully resident speed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from qwen3next.checkpoint_names import PROJECTIONS, expert_tensor_name, packed_expert_name, quantized_names
from qwen3next.config import FULL_ATTENTION, Qwen3NextConfig
from qwen3next.errors import CheckpointError, RequestError
from qwen3next.request import OFFLOAD_PREFILL_CHUNK
from qwen3next.quant.checkpoint import stored_bits
from qwen3next.weights import CheckpointReader

from .budget import (ExpertPlan, check_cpu_budget, context_for_budget, default_cpu_budget, format_size, parse_size,
                     plan_experts)
from .bf16_experts import Bf16Compute
from .cached_experts import CachedExperts, ExpertCompute
from .disk import BlobReader
from .expert_cache import POLICIES, ExpertCache, LayerSource
from .prefetch import LookaheadPrefetcher
from .router_stats import RouterStatistics

DEFAULT_MAX_CONTEXT = 32768  # tokens of KV cache a default budget reserves (less if the model's context is shorter)


@dataclass(frozen=True)
class Placement:
    """Where weights go. cpu_mem/gpu_mem: budgets ("12G", bytes, None for what is free); gpu_mem 0
    means no GPU. max_context: tokens the KV cache is sized for. expert_policy: lru, lfu or stats."""

    cpu_mem: int | str | None = None
    gpu_mem: int | str | None = None
    max_context: int | None = None
    expert_policy: str = "stats"
    prefetch: bool = False  # measured so far, it reads more than it saves (docs/offload.md)

    def __post_init__(self) -> None:
        for name in ("cpu_mem", "gpu_mem"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, parse_size(value, name))
        if self.max_context is not None and (type(self.max_context) is not int or self.max_context < 1):
            raise RequestError("max_context", self.max_context, "must be an integer >= 1")
        if self.expert_policy not in POLICIES:
            raise RequestError("expert_policy", self.expert_policy, f"must be one of {', '.join(POLICIES)}")

    @property
    def limited(self) -> bool:
        return self.cpu_mem is not None


def resolve_device(placement: Placement, device: torch.device | None) -> torch.device | None:
    """gpu_mem 0 means "use no GPU"; a GPU budget without a GPU is an error naming the field."""
    if placement.gpu_mem is None:
        return device
    if not torch.cuda.is_available():
        raise RequestError("gpu_mem", placement.gpu_mem, "there is no CUDA device here (use 0, or leave it unset)")
    if placement.gpu_mem == 0:
        if device is not None and device.type == "cuda":
            raise RequestError("gpu_mem", 0, "0 means no GPU, but the device asked for is CUDA")
        return torch.device("cpu")
    return device


def kv_bytes_per_token(config: Qwen3NextConfig, dtype: torch.dtype, with_mtp: bool) -> int:
    """Keys and values of every full-attention layer (the MTP layer's included) for one position."""
    layers = sum(t == FULL_ATTENTION for t in config.layer_types) + (config.num_nextn_predict_layers if with_mtp else 0)
    return layers * 2 * config.num_key_value_heads * config.head_dim * dtype.itemsize


def recurrent_state_bytes(config: Qwen3NextConfig, dtype: torch.dtype) -> int:
    """Every DeltaNet layer's fp32 delta-rule state and conv window, which do not grow with the context."""
    layers = sum(t != FULL_ATTENTION for t in config.layer_types)
    k, v = config.linear_num_key_heads * config.linear_key_head_dim, config.linear_num_value_heads * config.linear_value_head_dim
    recurrent = config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim * 4
    conv = (2 * k + v) * (config.linear_conv_kernel_dim - 1) * dtype.itemsize
    return layers * (recurrent + conv)


def prefill_bytes_per_token(config: Qwen3NextConfig, dtype: torch.dtype) -> int:
    """What a prefill chunk holds per token at its widest (~0.23 MB at the real widths; the peak-RSS test
    holds it): the MoE's gathered inputs, results and weighted results (3 x top_k rows of hidden), DeltaNet's
    projections and their fp32 working copies, and a few hidden-wide residual tensors."""
    hidden, size = config.hidden_size, dtype.itemsize
    key = config.linear_num_key_heads * config.linear_key_head_dim
    value = config.linear_num_value_heads * config.linear_value_head_dim
    moe = 3 * config.num_experts_per_tok * hidden * size
    deltanet = (2 * key + 2 * value) * size + 2 * (2 * key + value) * 4
    return moe + deltanet + 6 * hidden * size


def dense_bytes(reader: CheckpointReader, names: list[str], dtype: torch.dtype) -> int:
    """What the always-active weights take once loaded: quantized matrices as stored, the rest in `dtype`."""
    total = 0
    for name in names:
        bits = stored_bits(reader, name)
        if bits is None:
            shape = reader.shape(name)
            total += int(torch.Size(shape).numel()) * (dtype.itemsize if reader.dtype(name).is_floating_point
                                                       else reader.dtype(name).itemsize)
        else:
            total += sum(reader.byte_range(stored)[2] for stored in quantized_names(name, bits))
    return total


def plan_memory(placement: Placement, reader: CheckpointReader, config: Qwen3NextConfig, dense_names: list[str],
                slot_bytes: int, layers: int, dtype: torch.dtype, with_mtp: bool, quiet: bool,
                budget: int | None = None) -> ExpertPlan:
    """The CPU split (checked before any weight is read): `slot_bytes` per routed expert as the cache holds
    it, `layers` MoE layers. `budget` overrides the placement's (or the free memory's) figure."""
    if budget is None:
        budget = placement.cpu_mem if placement.cpu_mem is not None else default_cpu_budget()
        if placement.cpu_mem is not None and not quiet:
            warning = check_cpu_budget(budget)
            if warning:
                print(f"qwen3next: warning: {warning}", file=sys.stderr)
    always = dense_bytes(reader, dense_names, dtype)
    fixed = recurrent_state_bytes(config, dtype)
    per_token = kv_bytes_per_token(config, dtype, with_mtp)
    top_k, experts = config.num_experts_per_tok, config.num_experts * layers
    if placement.max_context is not None and placement.max_context > config.max_position_embeddings:
        raise RequestError("max_context", placement.max_context,
                           f"the model's context (max_position_embeddings) is {config.max_position_embeddings}")

    def context_within(room: int) -> int:
        """The chosen context, else the longest `room` bytes of budget leave room for (at most the default)."""
        if placement.max_context is not None:
            return placement.max_context
        longest = context_for_budget(room, always, fixed, per_token, slot_bytes, top_k, config.max_position_embeddings)
        return max(1, min(config.max_position_embeddings, DEFAULT_MAX_CONTEXT, longest))

    plan = plan_experts(budget, always, fixed, per_token, context_within(budget), slot_bytes, experts, top_k)
    if plan.fully_resident:
        return plan
    # Experts come from disk: prefill takes larger chunks (one pass over the experts each), whose working
    # memory the budget pays for too: at most half of all the experts' bytes (a small model's 4096-token
    # chunk can need more than all its experts), and where memory is tight, at most half of what is
    # left after one step's experts, the default context taking no more than the other half.
    per_prefill_token = prefill_bytes_per_token(config, dtype)
    largest = min(OFFLOAD_PREFILL_CHUNK, slot_bytes * experts // 2 // per_prefill_token) * per_prefill_token
    spare = max(0, budget - always - fixed - plan.read_buffers)
    context = context_within(budget - min(largest, spare // 2))
    left = budget - always - fixed - per_token * context - plan.read_buffers
    chunk = max(1, min(largest // per_prefill_token, context, left // per_prefill_token))
    return plan_experts(budget, always, fixed, per_token, context, slot_bytes, experts, top_k,
                        prefill_state=chunk * per_prefill_token, prefill_tokens=chunk)


def quantized_sources(reader: CheckpointReader, prefixes: dict[int, str], experts: int) -> dict[int, LayerSource]:
    """A quantized folder's experts: one blob each."""
    return {layer: LayerSource(tuple((reader.byte_range(packed_expert_name(prefix, e)),) for e in range(experts)))
            for layer, prefix in prefixes.items()}


def unquantized_sources(reader: CheckpointReader, prefixes: dict[int, str], experts: int) -> dict[int, LayerSource]:
    """A bf16 (or fp32) folder's experts: gate, up and down, three ranges each, laid end to end in a slot."""
    return {layer: LayerSource(tuple(tuple(reader.byte_range(expert_tensor_name(prefix, e, p)) for p in PROJECTIONS)
                                     for e in range(experts)))
            for layer, prefix in prefixes.items()}


def unquantized_compute(reader: CheckpointReader, prefixes: dict[int, str], dtype: torch.dtype) -> Bf16Compute:
    """The compute piece for a bf16/fp32 folder's experts, from their stored dtype and shapes."""
    names = {layer: [expert_tensor_name(prefix, 0, p) for p in PROJECTIONS] for layer, prefix in prefixes.items()}
    stored = {reader.dtype(name) for layer_names in names.values() for name in layer_names}
    if len(stored) != 1:
        raise CheckpointError(f"{reader.folder}: routed experts are stored in several dtypes "
                              f"({', '.join(sorted(map(str, stored)))}); the expert cache needs one")
    shapes = {layer: tuple(reader.shape(layer_names[2]))[::-1] for layer, layer_names in names.items()}  # down: [H, I]
    return Bf16Compute(shapes, stored.pop(), dtype)


def expert_cache_store(plan: ExpertPlan, placement: Placement, sources: dict[int, LayerSource],
                       compute: ExpertCompute, config: Qwen3NextConfig, device: torch.device, routers: dict,
                       statistics: RouterStatistics | None = None, progress=lambda n: None) -> CachedExperts:
    """The expert cache for a folder, filled (all of it when everything fits, else the experts the router
    statistics say are hottest first), with prefetch when experts come from disk and it is asked for."""
    experts = config.num_experts
    order = priors = None
    if statistics is not None:
        order = {layer: list(dict.fromkeys(statistics.hottest(layer, experts) + list(range(experts))))
                 for layer in sources}
        counts = statistics.counts.double()
        priors = {layer: counts[layer] / counts[layer].max().clamp(min=1) for layer in sources}
    cache = ExpertCache(sources, plan.slots, config.num_experts_per_tok, BlobReader(drop_pages=not plan.fully_resident),
                        policy=placement.expert_policy, priors=priors)
    cache.fill(order=order, progress=progress)
    prefetcher = None
    if placement.prefetch and not cache.complete:
        prefetcher = LookaheadPrefetcher(cache, routers, config.num_experts_per_tok, statistics)
    return CachedExperts(cache, compute, device, prefetcher)


def suggest_quantizing(folder, plan: ExpertPlan) -> str:
    """What `run` says when a bf16 folder's experts come from disk: each miss reads 3.6x a 4-bit blob."""
    return (f"qwen3next: {plan.experts - plan.slots} of {plan.experts} experts of this unquantized folder are read "
            f"from disk at {format_size(plan.slot_bytes)} each; 4-bit experts read 3.6x less: "
            f"qwen3next quantize {folder} OUT --bits 4, then run -m OUT")
