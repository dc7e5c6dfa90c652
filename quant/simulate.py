"""Quantize a loaded model's weights in place and back ("fake quantization"), to measure quality.

Every chosen weight is replaced by dequantize(quantize(weight)): the numbers a quantized model
computes with, up to the accumulation order of its kernels. That measures what a format and a
policy cost before any file is written, and it is how `--verify` style checks compare formats.
"""

from __future__ import annotations

from typing import Callable

import torch

from qwen3next.checkpoint_names import expert_layer_prefixes, expert_tensor_name
from qwen3next.model import Qwen3NextForCausalLM
from qwen3next.offload.store import ResidentExpertStore

from . import int4, int8


def round_trip(weight: torch.Tensor, bits: int, group: int = int4.DEFAULT_GROUP) -> torch.Tensor:
    """weight [out, in] as the `bits`-bit format stores it, back in the weight's dtype."""
    if bits == 8:
        return int8.dequantize(*int8.quantize(weight), dtype=weight.dtype)
    if bits == 4:
        return int4.dequantize(*int4.quantize(weight, int4.group_for(weight.shape[1], group)), dtype=weight.dtype)
    raise ValueError(f"bits must be 4 or 8, not {bits}")


@torch.no_grad()
def fake_quantize_(model: Qwen3NextForCausalLM, store: ResidentExpertStore,
                   bits_for: Callable[[str], int | None], group: int = int4.DEFAULT_GROUP,
                   round_trip: Callable[[torch.Tensor, int, int], torch.Tensor] = round_trip) -> None:
    """Round-trip every matrix `bits_for(hub name)` gives bits to; routed experts are asked by their hub names.

    `round_trip(weight, bits, group)` defaults to this project's formats; benchmarks pass others.
    """
    for name, parameter in model.named_parameters():
        bits = bits_for(name)
        if bits is not None and parameter.dim() == 2:
            parameter.copy_(round_trip(parameter, bits, group))
    intermediate = model.config.moe_intermediate_size
    for layer, prefix in expert_layer_prefixes(model.config, model.mtp is not None).items():
        experts = store.layers[layer]
        for e in range(experts.gate_up.shape[0]):
            parts = {"gate_proj": experts.gate_up[e, :intermediate], "up_proj": experts.gate_up[e, intermediate:],
                     "down_proj": experts.down[e]}
            for projection, weight in parts.items():
                bits = bits_for(expert_tensor_name(prefix, e, projection))
                if bits is not None:
                    weight.copy_(round_trip(weight, bits, group))
