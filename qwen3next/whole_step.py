"""A decode step, or a verify pass of a few positions, through every decoder layer in one C call.

With the layer kernels (csrc/layer_kernels.c) a step still returned to Python twice a layer: for the
mixer call and for the MoE block, each with its checks, allocations and module calls, about half of a
small model's step. Where every layer's mixer kernel and fused MoE block apply and every expert is
resident, `run_layers` fills one q3n_step_layer entry per layer with this step's state (DeltaNet states,
KV buffers, routing outputs) and makes one q3n_decode_layers call, which makes the same kernel calls in
the same order, so the result has the same bits as the layer-by-layer path. Afterwards it does what
the modules would have done: advance the KV lengths, keep a verify pass's DeltaNet states, set each MoE
block's last routing and report it to the routing observers. An observer that needs the hidden state
before routing (the expert prefetcher) cannot be shown it here, so then the layers run one by one.
"""

from __future__ import annotations

import ctypes

import torch

from . import cpu_kernels
from .cache import ModelCache
from .config import FULL_ATTENTION
from .moe import Routing


class StepPlan:
    """The per-model part of a whole step: each layer with its mixer and MoE modules and whether it is an attention
    layer, and the ctypes array a step fills in; built again when any module was given a new submodule or tensor
    (cpu_kernels.rebind_count)."""

    def __init__(self, layers):
        self.layers = [(layer, layer.self_attn if layer.layer_type == FULL_ATTENTION else layer.linear_attn,
                        layer.mlp, layer.layer_type == FULL_ATTENTION) for layer in layers]
        self.entries = (cpu_kernels.StepLayer * len(self.layers))()
        self.rebinds = cpu_kernels.rebind_count()


def run_layers(model, x: torch.Tensor, cos_sin, cache: ModelCache, keep: bool) -> bool:
    """Run x [1, T, hidden] through model.model.layers in place if every layer's kernels apply; True if it did.
    keep: a verify pass (DeltaNet layers keep their per-token states, as with as_steps)."""
    T = x.shape[1]
    if x.shape[0] != 1 or T > cpu_kernels.MAX_ROWS or not cpu_kernels.usable(x) or not x.is_contiguous():
        return False
    plan = model._step_plan
    if plan is None or plan.rebinds != cpu_kernels.rebind_count():
        plan = model._step_plan = StepPlan(model.model.layers)
    entries, count = plan.entries, len(plan.layers)
    experts, top_k = model.config.num_experts, model.config.num_experts_per_tok
    ids = torch.empty(count, T, top_k, dtype=torch.int64)
    weights, logits = torch.empty(count, T, top_k), torch.empty(count, T, experts)
    ids_at, weights_at, logits_at = ids.data_ptr(), weights.data_ptr(), logits.data_ptr()
    ids_bytes, weights_bytes, logits_bytes = (t.stride(0) * t.element_size() for t in (ids, weights, logits))
    kept = []  # per layer: the buffers a verify pass's DeltaNet states go to (None: attention, or no verify pass)
    for i, ((layer, mixer, moe, attention), state) in enumerate(zip(plan.layers, cache.layers)):
        built = layer._layer_kernel  # each layer's kernels as its module path would build them, or give up
        if not built or not built[1].valid():
            if layer._mixer_step(x, state, True) is None:
                return False
            built = layer._layer_kernel
        moe_kernel = moe._fused_weights(x) if hasattr(moe, "_fused_weights") else None
        observer = moe_kernel and moe.observer
        if moe_kernel is None or not moe.store.all_resident or (observer and getattr(observer, "needs_hidden", True)):
            return False
        entry = entries[i]
        entry.mixer, entry.moe = ctypes.addressof(built[1].struct), ctypes.addressof(moe_kernel.struct)
        entry.quantized_moe = isinstance(moe_kernel.struct, cpu_kernels.MoeQuant)
        entry.attention = attention
        if attention:
            state.reserve(mixer.key_shape, T)
            entry.keys, entry.values = state.keys.data_ptr(), state.values.data_ptr()
            entry.past, entry.capacity = state.length, state.keys.shape[2]
            kept.append(None)
        else:
            buffers = mixer._kernel_states(x, state, keep)
            entry.conv_state, entry.state = state.conv.data_ptr(), state.recurrent.data_ptr()
            entry.kept_state, entry.kept_conv = (None, None) if buffers is None else (buffers[0].data_ptr(),
                                                                                      buffers[1].data_ptr())
            kept.append(buffers)
        entry.ids, entry.weights = ids_at + i * ids_bytes, weights_at + i * weights_bytes
        entry.logits = logits_at + i * logits_bytes
    cos, sin = (table.contiguous() for table in cos_sin)
    cpu_kernels.decode_layers(entries, x, cos, sin)
    for (layer, mixer, moe, attention), state, buffers, layer_ids, layer_weights, layer_logits in zip(
            plan.layers, cache.layers, kept, ids.unbind(0), weights.unbind(0), logits.unbind(0)):
        if attention:
            state.length += T
        else:
            mixer._keep(state, buffers, keep)
        object.__setattr__(moe, "last_routing", Routing(layer_ids, layer_weights, layer_logits))  # a plain
        # attribute: nn.Module.__setattr__'s parameter and submodule checks cost more than the rest of this loop
        if moe.observer is not None:
            moe.observer.routed(moe.layer, layer_ids)
    return True
