"""The one place that turns a checkpoint folder into a runnable model.

config.json -> a model built on the meta device (no memory) -> every expected tensor checked
by name and shape before anything is read -> always-active weights read one tensor at a time
from the shards (pread, no memory map) onto the target device -> routed experts into an expert store.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from qwen3next.offload.budget import ExpertPlan
from qwen3next.offload.placement import (Placement, expert_cache_store, plan_memory, quantized_sources,
                                         suggest_quantizing, unquantized_compute, unquantized_sources)
from qwen3next.offload.cached_experts import ExpertCompute
from qwen3next.offload.quantized_experts import QuantizedCompute
from qwen3next.offload.router_stats import RouterStatistics
from qwen3next.offload.store import ResidentExpertStore
from qwen3next.quant import checkpoint as quantized
from qwen3next.quant.modules import QuantizedEmbedding, QuantizedLinear

from .checkpoint_names import expected_shapes, expert_layer_prefixes, has_mtp, meta_model, quantized_names
from .config import Qwen3NextConfig
from .errors import CheckpointError, UsageError
from .model import Qwen3NextForCausalLM
from .moe import ExpertStore
from .weights import CheckpointReader

# what `dtype=` / --dtype accept -> the torch dtype the model computes in
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
                  "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in COMPUTE_DTYPES.values():
            raise UsageError(f"dtype {dtype} is not supported (use bfloat16, float16 or float32)")
        return dtype
    try:
        return COMPUTE_DTYPES[str(dtype).lower()]
    except KeyError:
        raise UsageError(f"--dtype {dtype!r} is not one of bfloat16, float16, float32") from None


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))


def load_model(
    folder: str | Path,
    dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device = "cpu",
    progress: bool = True,
    config: Qwen3NextConfig | None = None,
    placement: Placement | None = None,
    statistics: RouterStatistics | None = None,
    quiet: bool = True,
) -> tuple[Qwen3NextForCausalLM, ExpertStore, ExpertPlan | None]:
    """Load weights (and config.json, unless given) from a Hugging Face-layout folder; returns
    (model, store, plan): plan is the memory split (None for a bf16 folder loaded whole with no budget).

    A folder written by `qwen3next quantize` loads the same way: its quantized matrices become
    QuantizedLinear / QuantizedEmbedding modules and its expert blobs go into an expert cache sized
    by `placement` (offload/placement.py), filled hottest first by the router `statistics`. A bf16
    folder's experts load whole when they fit, else into the same cache (three matrices per slot).
    """
    placement = placement or Placement()
    dtype = resolve_dtype(dtype)
    device = torch.device(device)
    config = config or Qwen3NextConfig.from_file(folder)
    with CheckpointReader(folder) as reader:
        with_mtp = has_mtp(reader.names())
        model = meta_model(config, with_mtp)
        prefixes = expert_layer_prefixes(config, with_mtp)
        dense_names = list(model.state_dict())
        plan, sources, compute = check_and_plan(placement, reader, model, prefixes, dense_names, dtype, with_mtp, quiet)
        is_quantized = config.quantization is not None
        stacked = not is_quantized and (plan is None or plan.fully_resident)  # bf16 experts that all fit: stacked

        def read(name: str) -> torch.Tensor:
            return reader.read(name).to(device=device, dtype=dtype)

        total = len(dense_names) + len(prefixes) * config.num_experts
        with tqdm(total=total, desc="loading", unit="tensor", disable=not progress, leave=False, delay=1.0) as bar:
            for name in dense_names:
                bits = quantized.stored_bits(reader, name) if is_quantized else None
                if bits is None:
                    _assign(model, name, read(name))
                else:
                    arrays = [reader.read(n).to(device=device) for n in quantized_names(name, bits)]
                    _swap_in_quantized(model, name, bits, arrays, dtype)
                bar.update(1)
            if stacked:
                store = ResidentExpertStore.from_tensors(prefixes, config.num_experts, read, bar.update)
            else:
                if not is_quantized and not quiet:
                    print(suggest_quantizing(folder, plan), file=sys.stderr)
                routers = {layer: model.model.layers[layer].mlp.gate for layer in prefixes
                           if layer < config.num_hidden_layers}
                store = expert_cache_store(plan, placement, sources, compute, config, device, routers, statistics,
                                           bar.update)
    model.set_expert_store(store)
    return model.eval(), store, plan


def check_and_plan(placement: Placement, reader: CheckpointReader, model: Qwen3NextForCausalLM,
                   prefixes: dict[int, str], dense_names: list[str], dtype: torch.dtype, with_mtp: bool, quiet: bool
                   ) -> tuple[ExpertPlan | None, dict, ExpertCompute]:
    """Every expected tensor checked by name and shape, then the memory plan, before any weight is read:
    returns (plan, expert sources per layer, the compute piece for their format). `inspect --plan`
    (offload/forecast.py) calls this too, so it shows the plan a run gets. plan is None for a bf16 folder
    whose experts all fit when no budget was asked for: it loads whole, unplanned."""
    config = model.config
    if config.quantization is not None:
        layouts = quantized.expert_layouts(config, list(prefixes.values()))
        reader.validate(quantized.expected_shapes(model, reader, layouts))
        sources = quantized_sources(reader, prefixes, config.num_experts)
        compute = QuantizedCompute({layer: layouts[prefix] for layer, prefix in prefixes.items()})
    else:
        reader.validate(expected_shapes(model, with_mtp))
        sources = unquantized_sources(reader, prefixes, config.num_experts)
        compute = unquantized_compute(reader, prefixes, dtype)
    slot_bytes = max(source.nbytes for source in sources.values())
    plan = plan_memory(placement, reader, config, dense_names, slot_bytes, len(prefixes), dtype, with_mtp, quiet)
    if config.quantization is None and plan.fully_resident and not placement.limited:
        plan = None
    return plan, sources, compute


def _swap_in_quantized(model: nn.Module, name: str, bits: int, arrays: list[torch.Tensor], dtype: torch.dtype) -> None:
    """Replace the module owning matrix `name` ("...q_proj.weight") by its quantized stand-in."""
    module_name, _, attr = name.rpartition(".")
    parent_name, _, child = module_name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr != "weight" or not isinstance(module, (nn.Linear, nn.Embedding)):
        raise CheckpointError(f"{name}: stored quantized, but it is not the weight of a linear or embedding layer")
    quantized_module = QuantizedEmbedding(bits, arrays, dtype) if isinstance(module, nn.Embedding) \
        else QuantizedLinear(bits, arrays)
    setattr(model.get_submodule(parent_name) if parent_name else model, child, quantized_module)
