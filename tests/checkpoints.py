"""Writes seeded random Qwen3-Next checkpoints in the real Hugging Face layout, at test sizes.

A folder gets config.json (as the hub writes it, or in transformers 5's spelling), sharded
safetensors + index with the hub's tensor names, generation_config.json, and a small trained
BPE tokenizer with Qwen's special tokens and chat template. Weight scales are chosen so random
models give logits that are not all near-ties.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from qwen3next.checkpoint_names import (PROJECTIONS, expert_layer_prefixes, expert_tensor_name, meta_model,
                                        packed_expert_name, quantized_names)
from qwen3next.config import Qwen3NextConfig
from qwen3next.quant import int4
from qwen3next.quant.layout import ALIGN, FORMAT_VERSION, ExpertLayout, array_specs
from qwen3next.quant.policy import Policy
from qwen3next.weights import encode_header, tensor_bytes, write_checkpoint, write_index
from tokenizer_fixture import QWEN_SPECIAL_TOKENS, write_tokenizer_files

SIZES = {
    # 3 DeltaNet layers + 1 full-attention layer, 8 experts top-2
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                 num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    # two full 3:1 groups, 16 experts top-4, GQA 4:1, DeltaNet value heads 2 per key head
    "small": dict(hidden_size=128, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                  linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=32, linear_value_head_dim=32,
                  num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64, shared_expert_intermediate_size=96),
    # the engine benchmark's configuration: the 80B model's head counts with every width divided by 4
    # (hidden 2048 -> 512, head dims 256/128 -> 64/32, expert width 512 -> 128), 8 layers, 64 experts top-8
    "bench": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=2, head_dim=64,
                  linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=32, linear_value_head_dim=32,
                  num_experts=64, num_experts_per_tok=8, moe_intermediate_size=128, shared_expert_intermediate_size=128),
    # the real model's widths (hidden 2048, 512 experts of 512 top-10, 16/2 heads of 256, 16/32 linear heads
    # of 128) with 4 layers: the quantization benchmark's checkpoint (~14 GB in bf16 with the real vocabulary)
    "real": dict(hidden_size=2048, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
                 linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                 linear_value_head_dim=128, num_experts=512, num_experts_per_tok=10, moe_intermediate_size=512,
                 shared_expert_intermediate_size=512),
}


def make_config(size: str, vocab_size: int, first_special_id: int, style: str = "hub", **overrides) -> dict:
    """A config.json dict. style "hub": flat RoPE keys like the 80B hub file; "v5": rope_parameters + layer_types."""
    dims = dict(SIZES[size])
    specials = {name: first_special_id + i for i, name in enumerate(QWEN_SPECIAL_TOKENS)}
    config = {
        "architectures": ["Qwen3NextForCausalLM"],
        "model_type": "qwen3_next",
        "vocab_size": vocab_size,
        "intermediate_size": 2 * dims["moe_intermediate_size"],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "linear_conv_kernel_dim": 4,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "router_aux_loss_coef": 0.001,
        "output_router_logits": False,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "bos_token_id": specials["<|endoftext|>"],
        "eos_token_id": specials["<|im_end|>"],
        **dims,
    }
    if style == "hub":
        config.update(rope_theta=10000000, partial_rotary_factor=0.25, rope_scaling=None, full_attention_interval=4)
    else:
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25}
        config["layer_types"] = [
            "full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(dims["num_hidden_layers"])
        ]
    config.update(overrides)
    return config


def random_tensors(config: dict, seed: int = 0, mtp: bool = True):
    """Yield (hub name, fp32 tensor) for every weight of `config`, deterministically from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    H, V = config["hidden_size"], config["vocab_size"]

    def normal(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=gen) * std + mean

    def linear(out_features, in_features):
        return normal(out_features, in_features, std=in_features**-0.5)

    def layer(prefix: str, full_attention: bool):
        yield f"{prefix}.input_layernorm.weight", normal(H, std=0.1)
        yield f"{prefix}.post_attention_layernorm.weight", normal(H, std=0.1)
        if full_attention:
            heads, kv, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
            yield f"{prefix}.self_attn.q_proj.weight", linear(2 * heads * d, H)
            yield f"{prefix}.self_attn.k_proj.weight", linear(kv * d, H)
            yield f"{prefix}.self_attn.v_proj.weight", linear(kv * d, H)
            yield f"{prefix}.self_attn.o_proj.weight", linear(H, heads * d)
            yield f"{prefix}.self_attn.q_norm.weight", normal(d, std=0.1)
            yield f"{prefix}.self_attn.k_norm.weight", normal(d, std=0.1)
        else:
            kh, vh = config["linear_num_key_heads"], config["linear_num_value_heads"]
            kd, vd = config["linear_key_head_dim"], config["linear_value_head_dim"]
            channels = 2 * kh * kd + vh * vd
            yield f"{prefix}.linear_attn.in_proj_qkvz.weight", linear(2 * kh * kd + 2 * vh * vd, H)
            yield f"{prefix}.linear_attn.in_proj_ba.weight", linear(2 * vh, H)
            yield f"{prefix}.linear_attn.conv1d.weight", normal(channels, 1, config["linear_conv_kernel_dim"], std=0.5)
            yield f"{prefix}.linear_attn.A_log", torch.empty(vh).uniform_(0.0, 2.0, generator=gen)
            yield f"{prefix}.linear_attn.dt_bias", normal(vh, std=0.5, mean=1.0)
            yield f"{prefix}.linear_attn.norm.weight", normal(vd, std=0.1, mean=1.0)
            yield f"{prefix}.linear_attn.out_proj.weight", linear(H, vh * vd)
        E, inter, shared = config["num_experts"], config["moe_intermediate_size"], config["shared_expert_intermediate_size"]
        yield f"{prefix}.mlp.gate.weight", normal(E, H, std=2 * H**-0.5)
        for e in range(E):
            yield f"{prefix}.mlp.experts.{e}.gate_proj.weight", linear(inter, H)
            yield f"{prefix}.mlp.experts.{e}.up_proj.weight", linear(inter, H)
            yield f"{prefix}.mlp.experts.{e}.down_proj.weight", linear(H, inter)
        yield f"{prefix}.mlp.shared_expert.gate_proj.weight", linear(shared, H)
        yield f"{prefix}.mlp.shared_expert.up_proj.weight", linear(shared, H)
        yield f"{prefix}.mlp.shared_expert.down_proj.weight", linear(H, shared)
        yield f"{prefix}.mlp.shared_expert_gate.weight", linear(1, H)

    yield "model.embed_tokens.weight", normal(V, H)
    layer_types = config.get("layer_types") or [
        "full_attention" if (i + 1) % config.get("full_attention_interval", 4) == 0 else "linear_attention"
        for i in range(config["num_hidden_layers"])
    ]
    for i, kind in enumerate(layer_types):
        yield from layer(f"model.layers.{i}", kind == "full_attention")
    yield "model.norm.weight", normal(H, std=0.1)
    if not config["tie_word_embeddings"]:
        yield "lm_head.weight", linear(V, H) * 4
    if mtp:
        yield "mtp.fc.weight", linear(H, 2 * H)
        for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            yield f"mtp.{norm}.weight", normal(H, std=0.1)
        yield from layer("mtp.layers.0", full_attention=True)


def write_model(
    folder: Path,
    size: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = 2**40,
    style: str = "hub",
    mtp: bool = True,
    vocab_size: int | None = None,
    **config_overrides,
) -> Path:
    """Write a complete random model folder; returns it. vocab_size defaults to the tokenizer's, padded."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = write_tokenizer_files(folder)
    vocab_size = vocab_size or -(-(tokens + 64) // 64) * 64  # padded past the tokenizer, as the real vocab is
    config = make_config(size, vocab_size, tokens - len(QWEN_SPECIAL_TOKENS), style, **config_overrides)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    eos = [config["eos_token_id"], config["bos_token_id"]]
    generation = {"bos_token_id": config["bos_token_id"], "pad_token_id": config["bos_token_id"], "eos_token_id": eos,
                  "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    tensors = ((name, t.to(dtype)) for name, t in random_tensors(config, seed, mtp))
    write_checkpoint(folder, tensors, max_shard_bytes=max_shard_bytes)
    return folder


QUANTIZED_SHARD_BYTES = 4 * 2**30


def write_quantized_model(folder: Path, layers: int, bits: int = 4, seed: int = 0, size: str = "real",
                          vocab_size: int = 151936, bits_for: tuple[tuple[str, int], ...] = ()) -> Path:
    """A random folder straight in the quantized format (no bf16 source), `layers` layers plus the MTP layer:
    random codes with scales that keep activations bounded, random bf16 routers, the default policy's bits.
    For models larger than RAM (benchmarks/bench_offload.py) and the memory-budget tests. bits_for: the
    policy's overrides, as `quantize --bits-for` takes them (("*.weight", 4): every matrix at 4 bits)."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = write_tokenizer_files(folder)
    raw = make_config(size, vocab_size, tokens - len(QWEN_SPECIAL_TOKENS), num_hidden_layers=layers,
                      max_position_embeddings=262144)
    config = Qwen3NextConfig.from_dict(raw)
    policy = Policy(bits, bits_for=bits_for)
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
        if current and size + item[3] > QUANTIZED_SHARD_BYTES:
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


def budget_for_slots(folder: Path, slots: int, **load_args) -> int:
    """A cpu_mem under which `folder` loads with exactly `slots` expert slots: a plan just below full residency
    (so it reserves what a budgeted plan reserves) with its slots swapped for these."""
    import qwen3next

    resident = qwen3next.load(folder, cpu_mem="1G", router_stats=False, **load_args).plan
    probe = resident.always_active + resident.context_state + (resident.experts - 1) * resident.slot_bytes
    return qwen3next.load(folder, cpu_mem=probe, router_stats=False, **load_args).plan.budget_for_slots(slots)
