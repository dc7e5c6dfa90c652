"""The model configuration, read from config.json as the hub ships it or as transformers 5 writes it.

Field names are config.json's own, so a reader of the hub file can find every value here.
The hub file (transformers 4.57) spells RoPE as flat keys (rope_theta, partial_rotary_factor,
rope_scaling) and derives the layer pattern from full_attention_interval; transformers 5 nests
RoPE in rope_parameters and writes layer_types explicitly. Both are accepted; an explicit
layer_types wins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

MODEL_TYPE = "qwen3_next"
LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"

# Fields a config.json must carry: without them the tensor shapes are unknown.
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
)


@dataclass
class Qwen3NextConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    head_dim: int | None = None
    intermediate_size: int = 5120
    linear_conv_kernel_dim: int = 4
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    rope_scaling: dict | None = None
    layer_types: list[str] = field(default_factory=list)
    full_attention_interval: int = 4
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    num_nextn_predict_layers: int = 1
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_type: str = MODEL_TYPE
    quantization: dict | None = None  # written by `qwen3next quantize` (docs/format.md)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not self.layer_types:
            self.layer_types = [
                FULL_ATTENTION if (i + 1) % self.full_attention_interval == 0 else LINEAR_ATTENTION
                for i in range(self.num_hidden_layers)
            ]
        self._validate()

    def _validate(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"config.json: {msg}")

        if len(self.layer_types) != self.num_hidden_layers:
            raise bad(f"layer_types has {len(self.layer_types)} entries, num_hidden_layers is {self.num_hidden_layers}")
        unknown = sorted(set(self.layer_types) - {LINEAR_ATTENTION, FULL_ATTENTION})
        if unknown:
            raise bad(f"unknown layer type(s) {unknown}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_attention_heads must be a multiple of num_key_value_heads")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise bad("linear_num_value_heads must be a multiple of linear_num_key_heads")
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise bad(f"num_experts_per_tok {self.num_experts_per_tok} is not in 1..num_experts ({self.num_experts})")
        if self.rope_scaling not in (None, {}) and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) not in (None, "default"):
            raise bad(f"rope_scaling {self.rope_scaling} is not supported (only default RoPE)")
        if self.quantization is not None and not isinstance(self.quantization, dict):
            raise bad("quantization must be an object")
        if self.hidden_act != "silu":
            raise bad(f"hidden_act {self.hidden_act!r} is not supported (Qwen3-Next uses silu)")

    # Derived sizes, named as the math in docs/architecture.md names them.
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer: int) -> bool:
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Qwen3NextConfig":
        """Build from a config.json dict in either the hub's or transformers 5's spelling."""
        model_type = raw.get("model_type")
        if model_type != MODEL_TYPE:
            raise ConfigError(f"config.json: model_type is {model_type!r}, expected {MODEL_TYPE!r}")
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise ConfigError(f"config.json: missing field(s) {', '.join(missing)}")
        values = dict(raw)
        rope = values.pop("rope_parameters", None) or {}
        if rope:
            values.setdefault("rope_theta", rope.get("rope_theta", cls.rope_theta))
            values.setdefault("partial_rotary_factor", rope.get("partial_rotary_factor", cls.partial_rotary_factor))
            if rope.get("rope_type", "default") != "default":
                values["rope_scaling"] = rope
        if "mtp_num_hidden_layers" in values:
            values.setdefault("num_nextn_predict_layers", values["mtp_num_hidden_layers"])
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in known and v is not None}
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"config.json: {exc}") from exc

    @classmethod
    def from_file(cls, path: str | Path) -> "Qwen3NextConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found (a Qwen3-Next model folder needs config.json)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("config.json", str(path), 1)) from None
