"""Expert stores: where the MoE blocks get their routed experts from.

The protocol (qwen3next.moe.ExpertStore) is `run(layer, x, ids, weights)`, called once per layer
and forward with just the experts the router chose, plus `address_table(layer)`, which lets a
store whose experts are all resident in bf16 on the CPU hand the whole MoE block of a decode
step to one kernel (then `run` is not called). This module has the simplest store, everything
resident on one device; the expert cache (offload/cached_experts.py) implements the same calls.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from qwen3next import cpu_kernels
from qwen3next.checkpoint_names import PROJECTIONS, expert_tensor_name
from qwen3next.moe import StackedExperts

from .bf16_experts import bf16_rows_kernel, token_by_token


class ResidentExpertStore:
    """All routed experts held in memory on one device, stacked per layer (moe.StackedExperts).

    bf16 batches on the CPU run through a per-layer table of weight addresses: decode-sized ones each
    token's experts in one kernel call (cpu_kernels.swiglu_experts_bf16), larger ones, where torch's
    bf16 GEMM is slow, the experts kernel (bf16_experts.bf16_rows_kernel, the same calls as a cache of
    bf16 experts makes); other batches run as grouped matmuls.
    """

    def __init__(self, layers: dict[int, StackedExperts]):
        self.layers = layers
        self._address_tables = {layer: _address_table(experts) for layer, experts in layers.items()}
        self._rows_kernels = {layer: None if self._address_tables[layer] is None else
                              bf16_rows_kernel(experts.intermediate_size, experts.gate_up.shape[-1])
                              for layer, experts in layers.items()}

    @classmethod
    def from_tensors(
        cls,
        layer_prefixes: dict[int, str],
        num_experts: int,
        read: Callable[[str], torch.Tensor],
        progress: Callable[[int], None] = lambda n: None,
    ) -> "ResidentExpertStore":
        """Build from a tensor reader (name -> tensor already in the wanted dtype and device).

        `layer_prefixes` maps expert-store layer ids to checkpoint prefixes, e.g.
        {0: "model.layers.0", ..., 48: "mtp.layers.0"}.
        """
        layers = {}
        for layer, prefix in layer_prefixes.items():
            gate_up = down = None
            for e in range(num_experts):
                gate, up, down_e = (read(expert_tensor_name(prefix, e, p)) for p in PROJECTIONS)
                if gate_up is None:  # shapes and dtype are known once the first expert is read
                    gate_up = gate.new_empty(num_experts, 2 * gate.shape[0], gate.shape[1])
                    down = down_e.new_empty(num_experts, *down_e.shape)
                torch.cat((gate, up), out=gate_up[e])
                down[e] = down_e
                progress(1)
            layers[layer] = StackedExperts(gate_up, down).requires_grad_(False)
        return cls(layers)

    def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        experts, table = self.layers[layer], self._address_tables[layer]
        if table is not None and cpu_kernels.usable(x):
            ids, weights = ids.to(torch.int64).contiguous(), weights.float().contiguous()  # the C side reads raw memory
            if self._rows_kernels[layer] is not None:
                return self._rows_kernels[layer](x, table, ids, weights)
            if x.shape[0] <= cpu_kernels.MAX_ROWS:
                return token_by_token(x, table, ids, weights, experts.intermediate_size)
        return experts(x, ids, weights)

    def address_table(self, layer: int) -> torch.Tensor | None:
        return self._address_tables[layer]

    def quantized_table(self, layer: int) -> None:
        return None  # stacked experts are never quantized blobs

    all_resident = True  # acquire and release have nothing to do

    def acquire(self, layer: int, ids: torch.Tensor, x: torch.Tensor) -> None:
        pass

    def release(self, layer: int, ids: torch.Tensor) -> None:
        pass

    def parameters(self) -> Iterable[torch.Tensor]:
        for experts in self.layers.values():
            yield from experts.parameters()

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


def _address_table(experts: StackedExperts) -> torch.Tensor | None:
    """[experts, 3] int64 addresses of each expert's gate, up and down matrices, for the CPU kernel.

    None unless the weights are contiguous bf16 on the CPU (the only case the kernel handles).
    """
    gate_up, down = experts.gate_up, experts.down
    if any(p.dtype != torch.bfloat16 or p.device.type != "cpu" or not p.is_contiguous() for p in (gate_up, down)):
        return None
    E, two_i, H = gate_up.shape
    starts = gate_up.data_ptr() + torch.arange(E, dtype=torch.int64) * (two_i * H * gate_up.element_size())
    ups = starts + two_i // 2 * H * gate_up.element_size()
    downs = down.data_ptr() + torch.arange(E, dtype=torch.int64) * (down[0].numel() * down.element_size())
    return torch.stack((starts, ups, downs), dim=1).contiguous()
