"""What a model folder holds, from config.json and the shard headers alone (no tensor data is read).

The report is a list of sections, each carrying its JSON data and its table, so the views that
come with the offload engine (the placement plan, router statistics) are further sections.

Parameter counts come from the config (the shapes the model needs, built on the meta device), so
they are the model's own counts whatever format the weights are stored in; bytes and dtypes come
from the checkpoint. Active parameters per token follow the usual convention for MoE models:
everything but the routed experts, plus num_experts_per_tok routed experts in each MoE layer, with
the embedding and lm_head matrices counted whole; the MTP head is left out (it only drafts tokens)
and reported on its own.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .config import FULL_ATTENTION, Qwen3NextConfig
from .errors import ConfigError
from .checkpoint_names import expected_shapes, expert_layer_prefixes, has_mtp, meta_model
from .model import Qwen3NextForCausalLM
from .model_path import resolve_model_path
from .quant import checkpoint as quantized
from .weights import CheckpointReader, format_bytes

# Display order; a component appears when it has parameters or bytes.
COMPONENTS = ("embeddings", "attention", "DeltaNet", "norms", "routers", "shared experts", "routed experts",
              "dense MLP", "lm_head", "MTP", "other")
_LAYER_MARKERS = ((".self_attn.", "attention"), (".linear_attn.", "DeltaNet"), (".mlp.experts.", "routed experts"),
                  (".mlp.shared_expert", "shared experts"), (".mlp.gate.", "routers"), (".mlp.", "dense MLP"),
                  ("layernorm.", "norms"))
_KIND_NAMES = {FULL_ATTENTION: "full attention"}
_DELTANET = "Gated DeltaNet"


@dataclass
class Section:
    key: str  # its name in the JSON report
    title: str
    data: Any  # JSON-ready
    rows: list[tuple[str, ...]]
    header: tuple[str, ...] | None = None  # None: a list of (name, value) pairs


@dataclass
class Report:
    folder: Path
    sections: list[Section]

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.folder), **{s.key: s.data for s in self.sections}}


@dataclass(frozen=True)
class ParameterCounts:
    components: dict[str, int]  # every parameter, by component (the whole MTP head as "MTP")
    routed_per_token: int  # routed-expert parameters one token runs through, over all MoE layers

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def mtp(self) -> int:
        return self.components.get("MTP", 0)

    @property
    def main(self) -> int:
        return self.total - self.mtp

    @property
    def active(self) -> int:
        return self.main - self.components.get("routed experts", 0) + self.routed_per_token

    @property
    def active_without_embeddings(self) -> int:
        return self.active - self.components.get("embeddings", 0) - self.components.get("lm_head", 0)


def component_of(name: str) -> str:
    """The component a checkpoint tensor belongs to, from its hub name."""
    if name.startswith("mtp."):
        return "MTP"
    if name.startswith("model.embed_tokens."):
        return "embeddings"
    if name.startswith("lm_head."):
        return "lm_head"
    if name.startswith("model.norm."):
        return "norms"
    return next((component for marker, component in _LAYER_MARKERS if marker in name), "other")


def count_parameters(config: Qwen3NextConfig, shapes: Mapping[str, tuple[int, ...]]) -> ParameterCounts:
    components: Counter[str] = Counter()
    for name, shape in shapes.items():
        components[component_of(name)] += math.prod(shape)
    # every routed expert has the same shapes, so a token's share is top-k of num_experts
    routed_per_token = components["routed experts"] * config.num_experts_per_tok // config.num_experts
    return ParameterCounts(dict(components), routed_per_token)


def inspect(path: str | Path | None) -> Report:
    """Report on a model folder, a hub id in the local cache, or (None) the embedded demo model."""
    if path is not None and Path(path).expanduser().is_file():
        raise ConfigError(f"{path}: is a file; inspect takes a model folder (config.json and safetensors shards)")
    folder = resolve_model_path(path)
    config = Qwen3NextConfig.from_file(folder)
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    quantization = raw.get("quantization")
    with CheckpointReader(folder) as reader:
        tensors = [(name, reader.shape(name), reader.dtype(name), reader.byte_range(name)[2]) for name in reader.names()]
        shards = {reader.file_of(name) for name in reader.names()}
        with_mtp = has_mtp(reader.names())
        model = meta_model(config, with_mtp)
        shapes = expected_shapes(model, with_mtp)
        reader.validate(shapes if quantization is None else _quantized_shapes(model, reader, with_mtp))
    counts = count_parameters(config, shapes)
    return Report(folder, [
        _model_section(folder, config, raw, with_mtp),
        _layers_section(config),
        _parameters_section(config, counts),
        _components_section(counts, tensors),
        _dtypes_section(tensors, quantization is not None),
        _disk_section(folder, shards, sum(t[3] for t in tensors)),
        _quantization_section(quantization, tensors),
    ])


def format_count(n: int) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def _ranges(layers: Iterable[int]) -> str:
    """[0, 1, 2, 4, 5, 6, 7] -> "0-2, 4-7"."""
    spans: list[list[int]] = []
    for i in layers:
        if spans and spans[-1][1] == i - 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans) or "-"


def _pattern(kinds: list[str]) -> str:
    """The shortest repeating unit of the layer kinds: "(Gated DeltaNet x3, full attention) x12"."""
    n = len(kinds)
    period = next(p for p in range(1, n + 1) if n % p == 0 and kinds == kinds[:p] * (n // p))
    runs: list[list] = []
    for kind in kinds[:period]:
        if runs and runs[-1][0] == kind:
            runs[-1][1] += 1
        else:
            runs.append([kind, 1])
    unit = ", ".join(kind if count == 1 else f"{kind} x{count}" for kind, count in runs)
    return f"({unit}) x{n // period}" if n > period else unit


def _kind(layer_type: str) -> str:
    return _KIND_NAMES.get(layer_type, _DELTANET)


def _model_section(folder: Path, config: Qwen3NextConfig, raw: dict, with_mtp: bool) -> Section:
    c = config
    architecture = (raw.get("architectures") or [c.model_type])[0]
    data = {
        "architecture": architecture, "model_type": c.model_type, "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers, "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_word_embeddings, "max_position_embeddings": c.max_position_embeddings,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim, "rotary_dim": c.rotary_dim, "linear_num_key_heads": c.linear_num_key_heads,
        "linear_num_value_heads": c.linear_num_value_heads, "linear_key_head_dim": c.linear_key_head_dim,
        "linear_value_head_dim": c.linear_value_head_dim, "num_experts": c.num_experts,
        "num_experts_per_tok": c.num_experts_per_tok, "moe_intermediate_size": c.moe_intermediate_size,
        "shared_expert_intermediate_size": c.shared_expert_intermediate_size,
        "mtp_layers": c.num_nextn_predict_layers if with_mtp else 0,
    }
    rows = [
        ("path", str(folder)),
        ("architecture", f"{architecture} ({c.model_type})"),
        ("hidden size", str(c.hidden_size)),
        ("vocabulary", f"{c.vocab_size}" + (" (lm_head tied to the embeddings)" if c.tie_word_embeddings else "")),
        ("context", f"{c.max_position_embeddings} tokens"),
        ("full attention", f"{c.num_attention_heads} query / {c.num_key_value_heads} KV heads of {c.head_dim}, "
                           f"RoPE on {c.rotary_dim} dims, output gate"),
        (_DELTANET, f"{c.linear_num_key_heads} key heads of {c.linear_key_head_dim}, {c.linear_num_value_heads} "
                    f"value heads of {c.linear_value_head_dim}, conv {c.linear_conv_kernel_dim}"),
        ("experts", f"{c.num_experts} routed of width {c.moe_intermediate_size}, top {c.num_experts_per_tok} per token, "
                    f"+ 1 shared of width {c.shared_expert_intermediate_size}"),
        ("MTP head", f"{c.num_nextn_predict_layers} layer(s)" if with_mtp else "not in this checkpoint"),
    ]
    return Section("model", "model", data, rows)


def _layers_section(config: Qwen3NextConfig) -> Section:
    n = config.num_hidden_layers
    kinds = [_kind(t) for t in config.layer_types]
    moe = [i for i in range(n) if config.is_moe_layer(i)]
    groups = {
        _DELTANET: [i for i, k in enumerate(kinds) if k == _DELTANET],
        "full attention": [i for i, k in enumerate(kinds) if k != _DELTANET],
        "sparse MoE": moe,
        "dense MLP": [i for i in range(n) if i not in moe],
    }
    rows = [(name, str(len(layers)), _ranges(layers)) for name, layers in groups.items() if layers]
    rows.append(("pattern", str(n), _pattern(kinds)))
    data = {"layer_types": list(config.layer_types), "deltanet_layers": groups[_DELTANET],
            "full_attention_layers": groups["full attention"], "moe_layers": moe, "dense_mlp_layers": groups["dense MLP"]}
    return Section("layers", "layers", data, rows, header=("kind", "count", "layers"))


def _parameters_section(config: Qwen3NextConfig, counts: ParameterCounts) -> Section:
    k, e = config.num_experts_per_tok, config.num_experts
    lines = [  # (JSON key, label, value, note)
        ("total", "total", counts.total, "all weights, the MTP head included"),
        ("without_mtp", "without MTP", counts.main, "the model that generates"),
        ("mtp", "MTP head", counts.mtp, "multi-token prediction (drafts tokens)"),
        ("routed_experts", "routed experts", counts.components.get("routed experts", 0), f"{e} per MoE layer"),
        ("active_per_token", "active per token", counts.active,
         f"all but routed experts, plus {k} of the {e} routed experts per MoE layer; MTP left out"),
        ("active_per_token_without_embeddings", "active, no embeddings", counts.active_without_embeddings,
         "the same without the embedding and lm_head matrices"),
    ]
    data = {key: value for key, _, value, _ in lines}
    rows = [(label, format_count(value), f"{value:,}", note) for _, label, value, note in lines]
    return Section("parameters", "parameters", data, rows, header=("", "count", "exact", ""))


def _components_section(counts: ParameterCounts, tensors: list) -> Section:
    n_tensors: Counter[str] = Counter()
    n_bytes: Counter[str] = Counter()
    for name, _, _, length in tensors:
        n_tensors[component_of(name)] += 1
        n_bytes[component_of(name)] += length
    total_bytes = sum(n_bytes.values()) or 1
    data = {c: {"tensors": n_tensors[c], "parameters": counts.components.get(c, 0), "bytes": n_bytes[c]}
            for c in COMPONENTS if counts.components.get(c) or n_bytes[c]}
    rows = [(c, str(d["tensors"]), format_count(d["parameters"]), format_bytes(d["bytes"]),
             f"{100 * d['bytes'] / total_bytes:.1f}%") for c, d in data.items()]
    rows.append(("total", str(len(tensors)), format_count(counts.total), format_bytes(sum(n_bytes.values())), "100.0%"))
    return Section("components", "bytes per component", data, rows,
                   header=("component", "tensors", "parameters", "bytes", "share"))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _storage(name: str, dtype: torch.dtype) -> str:
    """How a tensor is stored: its dtype, or for quantized checkpoints the format it belongs to."""
    base, _, suffix = name.rpartition(".")
    if suffix == "packed":
        return "routed expert blobs"
    if suffix in ("q8", "q4") or (suffix in ("scale", "min") and base.endswith(".weight")):
        return "8-bit matrices" if suffix == "q8" or dtype == torch.float32 else "4-bit matrices"
    return _dtype_name(dtype)


def _dtypes_section(tensors: list, quantized: bool) -> Section:
    data: dict[str, dict[str, int]] = {}
    for name, shape, dtype, length in tensors:
        key = _storage(name, dtype) if quantized else _dtype_name(dtype)
        d = data.setdefault(key, {"tensors": 0, "elements": 0, "bytes": 0})
        d["tensors"] += 1
        d["elements"] += math.prod(shape)
        d["bytes"] += length
    rows = [(name, str(d["tensors"]), format_count(d["elements"]), format_bytes(d["bytes"])) for name, d in data.items()]
    title, first = ("bytes per format", "format") if quantized else ("bytes per dtype", "dtype")
    return Section("dtypes", title, data, rows, header=(first, "tensors", "elements", "bytes"))


def _quantized_shapes(model: Qwen3NextForCausalLM, reader: CheckpointReader, with_mtp: bool) -> dict:
    """What a `qwen3next quantize` folder must hold (quant/checkpoint.py), so inspect checks it as the loader will."""
    layouts = quantized.expert_layouts(model.config, list(expert_layer_prefixes(model.config, with_mtp).values()))
    return quantized.expected_shapes(model, reader, layouts)


def _disk_section(folder: Path, shards: set[Path], tensor_bytes: int) -> Section:
    shard_bytes = sum(p.stat().st_size for p in shards)
    folder_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    data = {"shards": len(shards), "shard_bytes": shard_bytes, "tensor_bytes": tensor_bytes, "folder_bytes": folder_bytes}
    rows = [
        ("weight files", f"{len(shards)} safetensors file(s), {format_bytes(shard_bytes)}"),
        ("tensor data", format_bytes(tensor_bytes)),
        ("whole folder", format_bytes(folder_bytes)),
    ]
    return Section("disk", "disk", data, rows)


def _quantization_section(quantization: Any, tensors: list) -> Section:
    if quantization is None:
        dtypes = sorted({_dtype_name(dtype) for _, _, dtype, _ in tensors})
        return Section("quantization", "quantization", None, [("format", f"none ({', '.join(dtypes)})")])
    rows = [(str(k), v if isinstance(v, str) else json.dumps(v)) for k, v in quantization.items() if k != "experts"]
    layers_by_layout: dict[str, list[str]] = {}
    for prefix, spec in (quantization.get("experts") or {}).items():
        described = ", ".join(f"{p.removesuffix('_proj')} {s['bits']}-bit" + (f" g{s['group']}" if s["bits"] == 4 else "")
                              for p, s in spec.items())
        layers_by_layout.setdefault(described, []).append(prefix)
    for described, prefixes in layers_by_layout.items():
        rows.append(("routed experts", f"{described} ({len(prefixes)} layers: {prefixes[0]} .. {prefixes[-1]})"))
    return Section("quantization", "quantization", quantization, rows)
