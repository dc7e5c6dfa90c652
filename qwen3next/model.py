"""Qwen3-Next as one readable model: decoder layers, the causal LM, and its multi-token-prediction head.

Attribute names equal the checkpoint's tensor names (model.layers.3.self_attn.q_proj.weight,
mtp.fc.weight, ...), so `state_dict()` keys are hub names. Routed experts are the exception:
they live in an expert store (see moe.py), keyed by (layer, expert); the MTP layer's experts
are layer `num_hidden_layers + i`.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import GatedAttention
from .cache import DeltaNetState, KVCache, ModelCache
from .config import FULL_ATTENTION, Qwen3NextConfig
from .deltanet import GatedDeltaNet
from . import cpu_kernels, whole_step
from .layers import KERNEL_NORM_ELEMENTS, Linear, PartialRotary, SwiGLU, ZeroCenteredRMSNorm, linear
from .moe import ExpertStore, SparseMoE


class DecoderLayer(nn.Module):
    """Pre-norm block: h = x + mixer(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, config: Qwen3NextConfig, layer: int, layer_type: str, moe: bool):
        super().__init__()
        self.layer_type = layer_type
        if layer_type == FULL_ATTENTION:
            self.self_attn = GatedAttention(config)
        else:
            self.linear_attn = GatedDeltaNet(config)
        self.mlp = SparseMoE(config, layer) if moe else SwiGLU(config.hidden_size, config.intermediate_size)
        self.input_layernorm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_dim = config.rotary_dim
        self._layer_kernel = None  # (step, cpu_kernels.LayerKernel), False where none applies, None before building

    def make_cache(self, max_length: int | None = None) -> KVCache | DeltaNetState:
        return KVCache(max_length) if self.layer_type == FULL_ATTENTION else DeltaNetState()

    def forward(self, x: torch.Tensor, cos_sin, cache, as_steps: bool = False) -> torch.Tensor:
        """as_steps: compute each position as a one-token decode step would (Qwen3NextForCausalLM.decode_steps)."""
        step = self._mixer_step(x, cache, as_steps)
        if step is not None:  # norm, mixer, residual and the second norm in one kernel call
            x, h = step(x, cos_sin, cache, as_steps)
            return x + self.mlp(h, as_steps)
        h = self.input_layernorm(x)
        if self.layer_type == FULL_ATTENTION:
            h = self.self_attn(h, cos_sin, cache, as_steps)
        else:
            h = self.linear_attn(h, cache, as_steps)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x), as_steps)

    def _mixer_step(self, x: torch.Tensor, cache, as_steps: bool):
        """The one-call layer kernel's step where it applies: bf16 CPU kernels, one sequence with a cache, a
        decode step or a verify pass of up to MAX_ROWS positions. Built once (a decode step is mostly per-call
        overhead on small models: docs/performance.md), rebuilt if a weight moved."""
        if cache is None or x.shape[0] != 1 or not (x.shape[1] == 1 or as_steps) or not cpu_kernels.usable(x) \
                or x.shape[1] > cpu_kernels.MAX_ROWS:
            return None
        built = self._layer_kernel
        if built is None or (built and not built[1].valid()):
            built = self._layer_kernel = self._build_layer_kernel() or False
        return built[0] if built else None

    def _build_layer_kernel(self):
        norms = (self.input_layernorm.weight, self.post_attention_layernorm.weight)
        if any(n.dtype != torch.bfloat16 or n.device.type != "cpu" for n in norms):
            return None
        struct = cpu_kernels.LayerNorms(*(n.data_ptr() for n in norms), norms[0].shape[0], self.input_layernorm.eps)
        if self.layer_type == FULL_ATTENTION:
            return self.self_attn.layer_kernel(struct, list(norms), self.rotary_dim)
        return self.linear_attn.layer_kernel(struct, list(norms))

    def _apply(self, fn, *args, **kwargs):
        self._layer_kernel = None  # it points into the tensors this replaces
        return super()._apply(fn, *args, **kwargs)


class Backbone(nn.Module):
    """The `model.*` part of the checkpoint: embeddings, decoder layers, final norm."""

    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, config.layer_types[i], config.is_moe_layer(i))
            for i in range(config.num_hidden_layers)
        )
        self.norm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)


class MultiTokenPredictor(nn.Module):
    """The `mtp.*` head: predicts token t+2 from the main model's final hidden state at t and token t+1.

    u = fc([pre_fc_norm_embedding(embed(x_{t+1})) ; pre_fc_norm_hidden(h_t)]), then one
    full-attention decoder layer with its own MoE and KV cache, then norm; the main lm_head
    turns it into draft logits.
    """

    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        hidden = config.hidden_size
        self.fc = Linear(2 * hidden, hidden)
        self.pre_fc_norm_embedding = ZeroCenteredRMSNorm(hidden, config.rms_norm_eps)
        self.pre_fc_norm_hidden = ZeroCenteredRMSNorm(hidden, config.rms_norm_eps)
        self.layers = nn.ModuleList(
            DecoderLayer(config, config.num_hidden_layers + i, FULL_ATTENTION, moe=config.num_experts > 0)
            for i in range(config.num_nextn_predict_layers)
        )
        self.norm = ZeroCenteredRMSNorm(hidden, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, next_embeds: torch.Tensor, cos_sin, caches,
                as_steps: bool = False) -> torch.Tensor:
        u = self.fc(torch.cat((self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)), dim=-1))
        for layer, cache in zip(self.layers, caches):
            u = layer(u, cos_sin, cache, as_steps)
        return self.norm(u)


class Qwen3NextForCausalLM(nn.Module):
    def __init__(self, config: Qwen3NextConfig, with_mtp: bool = False):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size)
        self.mtp = MultiTokenPredictor(config) if with_mtp else None
        self.rotary = PartialRotary(config.rotary_dim, config.rope_theta)
        self._step_plan = None  # whole_step.StepPlan, built at the first whole-step call

    def _apply(self, fn, *args, **kwargs):
        self._step_plan = None
        return super()._apply(fn, *args, **kwargs)

    def set_expert_store(self, store: ExpertStore) -> None:
        for module in self.modules():
            if isinstance(module, SparseMoE):
                module.store = store

    def make_cache(self, max_length: int | None = None) -> ModelCache:
        """Empty per-layer states; max_length caps the KV buffers (the context the memory plan reserved)."""
        mtp = [] if self.mtp is None else [KVCache(max_length) for _ in self.mtp.layers]
        return ModelCache([layer.make_cache(max_length) for layer in self.model.layers], mtp)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits whatever the activation dtype: rounded to bf16 (a step of 0.0625 at logits of 8-16),
        close candidates become exact ties and greedy decoding picks the wrong one."""
        if self.lm_head is not None:
            return self.lm_head(hidden, fp32_out=True)
        embedding = self.model.embed_tokens  # tied: a quantized table projects itself
        if hasattr(embedding, "project"):
            return embedding.project(hidden, fp32_out=True)
        return linear(hidden, embedding.weight, fp32_out=True)

    def hidden_states(self, input_ids: torch.Tensor, cache: ModelCache | None = None) -> torch.Tensor:
        """Final normalised hidden states [B, T, hidden] for input_ids [B, T], advancing `cache`."""
        start = 0 if cache is None else cache.position
        T = input_ids.shape[1]
        x = self.model.embed_tokens(input_ids)
        cos_sin = self.rotary.cos_sin_range(start, T, input_ids.device, x.dtype)
        if cache is None or T != 1 or not whole_step.run_layers(self, x, cos_sin, cache, keep=False):
            layer_caches = [None] * len(self.model.layers) if cache is None else cache.layers
            for layer, layer_cache in zip(self.model.layers, layer_caches):
                x = layer(x, cos_sin, layer_cache)
        if cache is not None:
            cache.position += T
        return self.model.norm(x)

    def decode_steps(self, input_ids: torch.Tensor, cache: ModelCache) -> tuple[torch.Tensor, torch.Tensor, list[list]]:
        """Final hidden states [1, T, hidden] and fp32 logits [1, T, vocab] for input_ids [1, T], each position
        computed exactly as a one-token decode step computes it (a speculative verify pass), advancing `cache`.

        Also returns, per position t, each DeltaNet layer's state after t (None for attention layers), for
        `ModelCache.rewind`: kept states for t < T - 1, the live states for the last.

        Where every kernel computes each row alone (`rows_stand_alone`), the T positions share each layer's
        calls: every weight is read once for all of them and the per-call overhead is paid once. Elsewhere
        each position runs through its own one-token calls, layer by layer."""
        start, T = cache.position, input_ids.shape[1]
        x = self.model.embed_tokens(input_ids)
        tables = [self.rotary.cos_sin_range(p, 1, input_ids.device, x.dtype) for p in range(start, start + T)]
        if self.rows_stand_alone(x):
            cos_sin = self.rotary.cos_sin_range(start, T, input_ids.device, x.dtype)
            states: list[list] = [[] for _ in range(T)]
            whole = whole_step.run_layers(self, x, cos_sin, cache, keep=True)
            for layer, layer_cache in zip(self.model.layers, cache.layers):
                if not whole:
                    x = layer(x, cos_sin, layer_cache, as_steps=True)
                if isinstance(layer_cache, DeltaNetState):
                    kept = layer_cache.kept + [DeltaNetState(layer_cache.conv, layer_cache.recurrent)]
                    layer_cache.kept = None
                else:
                    kept = [None] * T
                for t in range(T):
                    states[t].append(kept[t])
            cache.position += T
            hidden = self.model.norm(x)
            return hidden, self.logits_from_hidden(hidden), states
        rows = list(x.split(1, dim=1))
        states = [[] for _ in range(T)]
        for layer, layer_cache in zip(self.model.layers, cache.layers):
            deltanet = isinstance(layer_cache, DeltaNetState)
            for t in range(T):
                rows[t] = layer(rows[t], tables[t], layer_cache)
                states[t].append(None if not deltanet else layer_cache.snapshot() if t < T - 1
                                 else DeltaNetState(layer_cache.conv, layer_cache.recurrent))
        cache.position += T
        hidden = [self.model.norm(row) for row in rows]
        return torch.cat(hidden, dim=1), torch.cat([self.logits_from_hidden(row) for row in hidden], dim=1), states

    def rows_stand_alone(self, x: torch.Tensor) -> bool:
        """Whether x's rows [1, T, hidden] can share every call of a decode step and still each get the bits of a
        step of their own: on the bf16 CPU kernels, which compute each row of a linear, norm or quantized matmul
        alone, within their row limits (tests/test_speculative.py holds them to it). torch's GEMMs and SDPA
        block rows differently by row count, so elsewhere they cannot."""
        c, T = self.config, x.shape[1]
        widest_norm = max(c.hidden_size, c.num_attention_heads * c.head_dim)  # elements a norm sees per row
        return (x.shape[0] == 1 and cpu_kernels.usable(x) and T <= cpu_kernels.MAX_ROWS
                and T * widest_norm <= KERNEL_NORM_ELEMENTS
                and all(layer.linear_attn.fused_kernel_applies(x) for layer in self.model.layers
                        if layer.layer_type != FULL_ATTENTION))

    def forward(self, input_ids: torch.Tensor, cache: ModelCache | None = None, last_only: bool = False) -> torch.Tensor:
        """fp32 logits [B, T, vocab] (or [B, 1, vocab] with last_only, which skips lm_head on the rest)."""
        hidden = self.hidden_states(input_ids, cache)
        if last_only:
            hidden = hidden[:, -1:]
        return self.logits_from_hidden(hidden)
