"""What `qwen3next quantize` will write, decided from config.json and the shard headers alone.

Every output tensor's name, dtype, shape and byte offset is known before any weight is read, so
each output shard's header is written first and its tensors are then streamed into place one
at a time; a resumed run can tell a finished shard by its exact planned size. One output shard
per source shard, under the same file name. A routed expert's blob goes to the shard of its
last-stored projection (the last to arrive when shards download in order), so a streaming
converter never needs a projection from a shard it has not seen yet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwen3next.checkpoint_names import PROJECTIONS, checkpoint_identity, expert_layer_prefixes, expert_tensor_name, \
    has_mtp, is_quantized_name, model_shapes, packed_expert_name, projection_shapes, quantized_names
from qwen3next.config import Qwen3NextConfig
from qwen3next.errors import CheckpointError, UsageError
from qwen3next.weights import SAFETENSORS_DTYPE_NAMES, CheckpointReader, encode_header

from . import int4
from .layout import ALIGN, FORMAT_VERSION, ExpertLayout, array_specs
from .policy import Policy

_FLOAT_DTYPES = {torch.bfloat16, torch.float16, torch.float32}


@dataclass
class OutputTensor:
    name: str
    dtype: str  # safetensors spelling
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # absolute offset in the output shard, set when the shard is laid out


@dataclass
class Kept:
    """A tensor copied byte for byte (routers, norms, conv, A_log, dt_bias, and --keep matches)."""

    name: str
    outputs: list[OutputTensor]
    source_bytes: int

    def source_names(self) -> list[str]:
        return [self.name]


@dataclass
class Matrix:
    """A [out, in] matrix stored at `bits` as codes + scales (+ minimums) (quant/layout.py)."""

    name: str
    bits: int
    group: int
    outputs: list[OutputTensor]
    source_bytes: int

    def source_names(self) -> list[str]:
        return [self.name]


@dataclass
class Expert:
    """One routed expert's three projections, packed into one blob."""

    prefix: str
    expert: int
    layout: ExpertLayout
    sources: dict[str, str]  # projection -> source tensor name
    outputs: list[OutputTensor]
    source_bytes: int

    def source_names(self) -> list[str]:
        return list(self.sources.values())


@dataclass(eq=False)  # compared by identity: a plan holds thousands of items
class ShardPlan:
    name: str  # output file name, equal to the source shard's
    source: Path
    items: list = field(default_factory=list)
    header: bytes = b""
    size: int = 0  # whole file, header included

    def tensors(self) -> list[OutputTensor]:
        return [t for item in self.items for t in item.outputs]

    def source_bytes(self) -> int:
        return sum(item.source_bytes for item in self.items)


@dataclass
class QuantizationPlan:
    shards: list[ShardPlan]
    expert_layouts: dict[str, ExpertLayout]  # layer prefix -> blob layout
    sharded: bool  # write an index (the source had one)
    source_identity: str  # the source model's checkpoint_identity: the quantized folder shares its statistics

    def config_section(self, policy: Policy, group: int) -> dict:
        """config.json's `quantization` entry: the format, the settings, and every layer's expert layout."""
        return {"format": "qwen3next", "format_version": FORMAT_VERSION, "bits": policy.expert_bits,
                "group_size": group, **{k: v for k, v in policy.describe().items() if k != "bits"},
                "experts": {prefix: layout.spec() for prefix, layout in self.expert_layouts.items()},
                "source_identity": self.source_identity}


def check_not_quantized(folder: Path, raw_config: dict, names: list[str]) -> None:
    if "quantization" in raw_config or any(is_quantized_name(n) for n in names):
        raise UsageError(f"{folder}: is already quantized by qwen3next; quantize a bf16/fp16/fp32 checkpoint")
    if "quantization_config" in raw_config:
        method = raw_config["quantization_config"].get("quant_method", "another tool")
        raise UsageError(f"{folder}: is already quantized ({method}); quantize a bf16/fp16/fp32 checkpoint")


def build_plan(folder: Path, reader: CheckpointReader, config: Qwen3NextConfig, policy: Policy,
               group: int) -> QuantizationPlan:
    """Decide every output tensor from the headers; raises on anything the conversion would trip over later."""
    names = reader.names()
    raw_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    check_not_quantized(folder, raw_config, names)
    with_mtp = has_mtp(names)
    reader.validate(model_shapes(config, with_mtp))
    policy.check_patterns_match(names)

    files = sorted({reader.file_of(n) for n in names})
    shard_of_file = {path: i for i, path in enumerate(files)}
    shards = [ShardPlan(path.name, path) for path in files]
    expert_names = set()
    layouts = {}
    for prefix in expert_layer_prefixes(config, with_mtp).values():
        layout = _expert_layout(prefix, config, policy, group)
        layouts[prefix] = layout
        for e in range(config.num_experts):
            sources = {p: expert_tensor_name(prefix, e, p) for p in PROJECTIONS}
            expert_names.update(sources.values())
            for source in sources.values():
                _require_float(reader, source)
            packed = OutputTensor(packed_expert_name(prefix, e), "U8", (layout.nbytes,), layout.nbytes)
            source_bytes = sum(reader.byte_range(s)[2] for s in sources.values())
            home = max(shard_of_file[reader.file_of(s)] for s in sources.values())
            shards[home].items.append(Expert(prefix, e, layout, sources, [packed], source_bytes))
    for name in names:
        if name not in expert_names:
            shards[shard_of_file[reader.file_of(name)]].items.append(_dense_item(reader, name, policy, group))
    for shard in shards:
        _lay_out(shard)
    return QuantizationPlan(shards, layouts, sharded=len(files) > 1 or files[0].name != "model.safetensors",
                            source_identity=checkpoint_identity(raw_config, ((n, reader.shape(n)) for n in names)))


def _require_float(reader: CheckpointReader, name: str) -> None:
    if reader.dtype(name) not in _FLOAT_DTYPES:
        raise CheckpointError(f"{reader.file_of(name)}: tensor {name} is {reader.dtype(name)}; "
                              "only bf16, fp16 and fp32 weights can be quantized")


def _expert_layout(prefix: str, config: Qwen3NextConfig, policy: Policy, group: int) -> ExpertLayout:
    """One layout per layer: every expert of a layer must get the same bits for each projection."""
    formats = {}
    for projection in PROJECTIONS:
        chosen = {e: policy.bits(expert_tensor_name(prefix, e, projection)) for e in range(config.num_experts)}
        if len(set(chosen.values())) > 1:
            raise UsageError(f"--bits-for patterns give the experts of {prefix} different bits for {projection}; "
                             "they must treat all experts of a layer alike")
        cols = projection_shapes(config.hidden_size, config.moe_intermediate_size)[projection][1]
        formats[projection] = {"bits": chosen[0], "group": _group(cols, group, prefix)}
    return ExpertLayout.build(config.hidden_size, config.moe_intermediate_size, formats)


def _group(cols: int, group: int, name: str) -> int:
    try:
        return int4.group_for(cols, group)
    except ValueError as exc:
        raise CheckpointError(f"{name}: {exc}") from None


def _dense_item(reader: CheckpointReader, name: str, policy: Policy, group: int):
    dtype, shape = reader.dtype(name), reader.shape(name)
    source_bytes = reader.byte_range(name)[2]
    bits = policy.bits(name)
    if bits is None or len(shape) != 2:
        stored = SAFETENSORS_DTYPE_NAMES.get(dtype)
        if stored is None:
            raise CheckpointError(f"{reader.file_of(name)}: tensor {name} has unsupported dtype {dtype}")
        return Kept(name, [OutputTensor(name, stored, tuple(shape), source_bytes)], source_bytes)
    _require_float(reader, name)
    rows, cols = shape
    group = _group(cols, group, name) if bits == 4 else cols
    outputs = [OutputTensor(out_name, st_dtype, out_shape, nbytes) for out_name, (st_dtype, out_shape, nbytes)
               in zip(quantized_names(name, bits), array_specs(rows, cols, bits, group))]
    return Matrix(name, bits, group, outputs, source_bytes)


def _lay_out(shard: ShardPlan) -> None:
    """Order the shard (expert blobs first, so each starts ALIGN-aligned), assign offsets, build the header.

    The header is padded with spaces so data starts at a multiple of ALIGN; blob sizes are
    multiples of ALIGN, so every blob's file offset is too.
    """
    shard.items.sort(key=lambda item: (0, _natural(item.prefix), item.expert) if isinstance(item, Expert)
                     else (1, (), 0, item.name))
    tensors = shard.tensors()
    shard.header, offsets = encode_header(((t.name, t.dtype, t.shape, t.nbytes) for t in tensors),
                                          {"format": "pt", "qwen3next_format": str(FORMAT_VERSION)}, ALIGN)
    for tensor, offset in zip(tensors, offsets):
        tensor.offset = len(shard.header) + offset
    shard.size = len(shard.header) + sum(t.nbytes for t in tensors)


def _natural(prefix: str) -> tuple:
    """model.layers.10 after model.layers.9."""
    return tuple(int(part) if part.isdigit() else part for part in prefix.split("."))
