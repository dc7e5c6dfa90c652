"""Checkpoint naming: which tensors a Qwen3-Next checkpoint holds, under which names, with which shapes.

The one owner of the hub's naming (and of the names `qwen3next quantize` adds, docs/format.md), so
the loader, the converter, `inspect` and the hub code agree by construction. Dense tensors are named
and shaped by the model itself: attribute names equal hub names, so a model built on the meta device
(no memory) lists them. Routed experts are not model parameters (they live in an expert store), so
their names and shapes are made here from the config.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Iterable

import torch

from .config import Qwen3NextConfig
from .model import Qwen3NextForCausalLM

MTP_PREFIX = "mtp."  # the multi-token-prediction head; optional in a checkpoint
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # of a routed expert, in blob order
QUANTIZED_SUFFIXES = {8: (".q8", ".scale"), 4: (".q4", ".scale", ".min")}  # codes first
_PACKED = ".packed"


_ROUTED_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.(" + "|".join(PROJECTIONS) + r")\.weight$")


def is_routed_expert(name: str) -> bool:
    """Whether hub tensor `name` is one projection of a routed expert (expert_tensor_name's pattern)."""
    return _ROUTED_EXPERT.search(name) is not None


def has_mtp(names: Iterable[str]) -> bool:
    """Whether a checkpoint with these tensor names carries the MTP head."""
    return any(name.startswith(MTP_PREFIX) for name in names)


def expert_layer_prefixes(config: Qwen3NextConfig, with_mtp: bool) -> dict[int, str]:
    """Expert-store layer id -> checkpoint prefix, for every layer with a sparse MoE block.

    MTP layers take the ids after the main ones: {0: "model.layers.0", ..., 48: "mtp.layers.0"}.
    """
    prefixes = {i: f"model.layers.{i}" for i in range(config.num_hidden_layers) if config.is_moe_layer(i)}
    if with_mtp and config.num_experts > 0:
        for i in range(config.num_nextn_predict_layers):
            prefixes[config.num_hidden_layers + i] = f"mtp.layers.{i}"
    return prefixes


def expert_tensor_name(prefix: str, expert: int, projection: str) -> str:
    """The hub's name for one projection of one routed expert under a layer prefix ("model.layers.3")."""
    return f"{prefix}.mlp.experts.{expert}.{projection}.weight"


def packed_expert_name(prefix: str, expert: int) -> str:
    """The quantized format's blob of one routed expert (all three projections)."""
    return f"{prefix}.mlp.experts.{expert}{_PACKED}"


def quantized_names(name: str, bits: int) -> tuple[str, ...]:
    """The stored tensors of matrix `name` at `bits`: codes first, then scales (and minimums)."""
    return tuple(name + suffix for suffix in QUANTIZED_SUFFIXES[bits])


def is_quantized_name(name: str) -> bool:
    """Whether `name` is a tensor only the quantized format has: a matrix's codes or an expert blob."""
    return name.endswith((*(suffixes[0] for suffixes in QUANTIZED_SUFFIXES.values()), _PACKED))


def projection_shapes(hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """(rows, cols) of each routed-expert projection."""
    return {"gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden), "down_proj": (hidden, intermediate)}


def meta_model(config: Qwen3NextConfig, with_mtp: bool) -> Qwen3NextForCausalLM:
    """The model on the meta device: its names and shapes, no memory."""
    with torch.device("meta"):
        return Qwen3NextForCausalLM(config, with_mtp=with_mtp)


def dense_shapes(model: Qwen3NextForCausalLM) -> dict[str, tuple[int, ...]]:
    """Every tensor but the routed experts, with its shape (hub names)."""
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def expected_shapes(model: Qwen3NextForCausalLM, with_mtp: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor a bf16/fp16/fp32 checkpoint must hold, with its shape (hub names)."""
    config = model.config
    shapes = dense_shapes(model)
    projections = projection_shapes(config.hidden_size, config.moe_intermediate_size)
    for prefix in expert_layer_prefixes(config, with_mtp).values():
        for e in range(config.num_experts):
            for p in PROJECTIONS:
                shapes[expert_tensor_name(prefix, e, p)] = projections[p]
    return shapes


def model_shapes(config: Qwen3NextConfig, with_mtp: bool) -> dict[str, tuple[int, ...]]:
    """expected_shapes for a config alone."""
    return expected_shapes(meta_model(config, with_mtp), with_mtp)


def checkpoint_identity(raw_config: dict, shapes: Iterable[tuple[str, tuple[int, ...]]]) -> str:
    """What makes two folders the same model: config.json (less any `quantization` section) and the
    tensor names and shapes, hashed. `qwen3next quantize` records its source's identity, so every
    quantization of a model shares that model's router statistics."""
    config = {k: v for k, v in raw_config.items() if k != "quantization"}
    tensors = sorted([name, list(shape)] for name, shape in shapes)
    text = json.dumps({"config": config, "tensors": tensors}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]
