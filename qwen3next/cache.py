"""Per-layer generation state: a KV cache for full-attention layers, conv + recurrent state for DeltaNet.

The two kinds differ in a way speculative decoding cares about: a KV cache rolls back by
truncation, a DeltaNet state does not (it is overwritten in place of history), so
`ModelCache.snapshot()` copies DeltaNet states and only remembers KV lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_KV_MIN_CAPACITY = 256  # tokens; capacity then doubles, so decode and chunked prefill copy O(T) in all


class KVCache:
    """Keys and values [B, kv_heads, T, head_dim] of one attention layer, in a growing buffer.

    `limit` caps the buffer (the context a memory budget reserved room for), so doubling never
    allocates past it.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0
        self.limit = limit

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add new positions; return views of all cached keys and values."""
        new_length = self.length + k.shape[2]
        if self.keys is None or new_length > self.keys.shape[2]:
            capacity = 0 if self.keys is None else self.keys.shape[2]
            wanted = max(2 * capacity, _KV_MIN_CAPACITY)
            self._grow(k, v, max(new_length, wanted if self.limit is None else min(wanted, self.limit)))
        self.keys[:, :, self.length : new_length] = k
        self.values[:, :, self.length : new_length] = v
        self.length = new_length
        return self.keys[:, :, :new_length], self.values[:, :, :new_length]

    def _grow(self, k: torch.Tensor, v: torch.Tensor, capacity: int) -> None:
        keys = k.new_empty(*k.shape[:2], capacity, k.shape[3])
        values = v.new_empty(*v.shape[:2], capacity, v.shape[3])
        if self.keys is not None:
            keys[:, :, : self.length] = self.keys[:, :, : self.length]
            values[:, :, : self.length] = self.values[:, :, : self.length]
        self.keys, self.values = keys, values

    def snapshot(self) -> int:
        return self.length

    def restore(self, length: int) -> None:
        self.length = length


@dataclass
class DeltaNetState:
    """The last (kernel - 1) conv inputs [B, channels, kernel - 1] and the fp32 delta-rule state."""

    conv: torch.Tensor | None = None
    recurrent: torch.Tensor | None = None

    def snapshot(self) -> "DeltaNetState":
        return DeltaNetState(
            None if self.conv is None else self.conv.clone(),
            None if self.recurrent is None else self.recurrent.clone(),
        )

    def restore(self, saved: "DeltaNetState") -> None:
        """Copies again, since decode updates the states in place and a snapshot may be restored twice."""
        copy = saved.snapshot()
        self.conv, self.recurrent = copy.conv, copy.recurrent


class ModelCache:
    """The state of every layer plus the number of positions already processed."""

    def __init__(self, layer_caches: list) -> None:
        self.layers = layer_caches
        self.position = 0

    def snapshot(self) -> tuple[int, list]:
        return self.position, [layer.snapshot() for layer in self.layers]

    def restore(self, saved: tuple[int, list]) -> None:
        self.position, states = saved
        for layer, state in zip(self.layers, states):
            layer.restore(state)
