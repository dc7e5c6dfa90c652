"""config.json as the hub ships it and as transformers 5 writes it; shapes of the real 80B model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qwen3next.config import FULL_ATTENTION, LINEAR_ATTENTION, Qwen3NextConfig
from qwen3next.errors import ConfigError
from qwen3next.checkpoint_names import expected_shapes
from qwen3next.model import Qwen3NextForCausalLM

# config.json of Qwen/Qwen3-Next-80B-A3B-Instruct, as the hub ships it (written by transformers 4.57)
HUB_80B = {
    "architectures": ["Qwen3NextForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "full_attention_interval": 4,
    "head_dim": 256, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 5120, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
    "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_value_head_dim": 128,
    "max_position_embeddings": 262144, "mlp_only_layers": [], "model_type": "qwen3_next",
    "moe_intermediate_size": 512, "norm_topk_prob": True, "num_attention_heads": 16, "num_experts": 512,
    "num_experts_per_tok": 10, "num_hidden_layers": 48, "num_key_value_heads": 2, "output_router_logits": False,
    "partial_rotary_factor": 0.25, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000000,
    "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 512, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.57.0.dev0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}


def v5_spelling(raw: dict) -> dict:
    """The same config as transformers 5 writes it: rope_parameters and explicit layer_types."""
    raw = dict(raw)
    rope = {"rope_type": "default", "rope_theta": raw.pop("rope_theta"),
            "partial_rotary_factor": raw.pop("partial_rotary_factor")}
    raw.pop("rope_scaling")
    interval = raw.pop("full_attention_interval")
    raw["rope_parameters"] = rope
    raw["layer_types"] = [FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(48)]
    return raw


@pytest.mark.parametrize("spelling", [dict, v5_spelling])
def test_both_spellings_of_the_80b_config_agree(spelling):
    config = Qwen3NextConfig.from_dict(spelling(HUB_80B))
    assert config.rope_theta == 10_000_000 and config.partial_rotary_factor == 0.25
    assert config.rotary_dim == 64
    assert [i for i, t in enumerate(config.layer_types) if t == FULL_ATTENTION] == list(range(3, 48, 4))
    assert all(config.is_moe_layer(i) for i in range(48))
    assert config.eos_token_ids == [151645]


def test_explicit_layer_types_win_over_the_interval():
    raw = dict(HUB_80B, num_hidden_layers=4, layer_types=[FULL_ATTENTION] * 4)
    assert Qwen3NextConfig.from_dict(raw).layer_types == [FULL_ATTENTION] * 4


def test_mlp_only_layers_and_sparse_step():
    config = Qwen3NextConfig.from_dict(dict(HUB_80B, mlp_only_layers=[0], decoder_sparse_step=2))
    assert [config.is_moe_layer(i) for i in range(4)] == [False, True, False, True]


def test_real_model_shapes_and_parameter_counts():
    """The meta-device model of the 80B config has the hub's tensor shapes and parameter counts."""
    config = Qwen3NextConfig.from_dict(HUB_80B)
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(config, with_mtp=True)
    shapes = expected_shapes(model, with_mtp=True)
    assert shapes["model.layers.0.linear_attn.in_proj_qkvz.weight"] == (12288, 2048)
    assert shapes["model.layers.0.linear_attn.in_proj_ba.weight"] == (64, 2048)
    assert shapes["model.layers.0.linear_attn.conv1d.weight"] == (8192, 1, 4)
    assert shapes["model.layers.0.linear_attn.out_proj.weight"] == (2048, 4096)
    assert shapes["model.layers.0.linear_attn.norm.weight"] == (128,)
    assert shapes["model.layers.3.self_attn.q_proj.weight"] == (8192, 2048)
    assert shapes["model.layers.3.self_attn.k_proj.weight"] == (512, 2048)
    assert shapes["model.layers.3.self_attn.o_proj.weight"] == (2048, 4096)
    assert shapes["model.layers.47.mlp.experts.511.down_proj.weight"] == (2048, 512)
    assert shapes["mtp.fc.weight"] == (2048, 4096)
    assert shapes["mtp.layers.0.mlp.experts.0.gate_proj.weight"] == (512, 2048)
    main = sum(math.prod(s) for n, s in shapes.items() if not n.startswith("mtp."))
    mtp = sum(math.prod(s) for n, s in shapes.items() if n.startswith("mtp."))
    assert round(main / 1e9, 2) == 79.67
    assert round(mtp / 1e9, 2) == 1.65


def test_unknown_model_type_is_refused():
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        Qwen3NextConfig.from_dict(dict(HUB_80B, model_type="llama"))


def test_missing_field_is_named():
    raw = dict(HUB_80B)
    del raw["num_experts"]
    with pytest.raises(ConfigError, match="missing field.*num_experts"):
        Qwen3NextConfig.from_dict(raw)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layer_types": ["full_attention"] * 3}, "layer_types has 3 entries"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"num_experts_per_tok": 600}, "num_experts_per_tok"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4}}, "rope_scaling"),
    ],
)
def test_inconsistent_values_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        Qwen3NextConfig.from_dict(dict(HUB_80B, **change))


def test_unreadable_file_names_the_path(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        Qwen3NextConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(HUB_80B, model_type="bert")))
    with pytest.raises(ConfigError, match=f"{tmp_path}/config.json: model_type"):
        Qwen3NextConfig.from_file(tmp_path)
