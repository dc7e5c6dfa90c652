"""Per-layer generation state: a KV cache for full-attention layers, conv + recurrent state for DeltaNet.

The two kinds differ in a way speculative decoding cares about: a KV cache rolls back by
truncation, a DeltaNet state does not (it is overwritten in place of history), so
`ModelCache.snapshot()` copies DeltaNet states and only remembers KV lengths, and speculative
decoding's verify pass keeps a copy of each DeltaNet state per drafted position (`ModelCache.rewind`).
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
        self.reserve(k, k.shape[2])
        self.keys[:, :, self.length : new_length] = k
        self.values[:, :, self.length : new_length] = v
        self.length = new_length
        return self.keys[:, :, :new_length], self.values[:, :, :new_length]

    def reserve(self, like: torch.Tensor, count: int) -> None:
        """Room for `count` more positions of keys shaped like `like` [B, kv_heads, *, head_dim] (a layer kernel
        writes them into the buffers itself, then advances `length`)."""
        new_length = self.length + count
        if self.keys is None or new_length > self.keys.shape[2]:
            capacity = 0 if self.keys is None else self.keys.shape[2]
            wanted = max(2 * capacity, _KV_MIN_CAPACITY)
            self._grow(like, max(new_length, wanted if self.limit is None else min(wanted, self.limit)))

    def _grow(self, like: torch.Tensor, capacity: int) -> None:
        keys = like.new_empty(*like.shape[:2], capacity, like.shape[3])
        values = like.new_empty(*like.shape[:2], capacity, like.shape[3])
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
    """The last (kernel - 1) conv inputs [B, channels, kernel - 1] and the fp32 delta-rule state.

    `kept`: after a multi-token forward with as_steps, the states after each of its tokens but the last
    (written by the kernel; `ModelCache.rewind` takes one)."""

    conv: torch.Tensor | None = None
    recurrent: torch.Tensor | None = None
    kept: list["DeltaNetState"] | None = None

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
    """The state of every layer plus the number of positions already processed.

    `mtp` holds the MTP head's KV caches (one per MTP layer; empty without a head): they hold the
    head's entries for positions whose main hidden state and next token were both known, so they
    may lag the main layers (speculative.py) but never run ahead of them.
    """

    def __init__(self, layer_caches: list, mtp_caches: list[KVCache] | None = None) -> None:
        self.layers = layer_caches
        self.mtp = mtp_caches or []
        self.position = 0

    def snapshot(self) -> tuple[int, list, list[int]]:
        return self.position, [layer.snapshot() for layer in self.layers], [kv.snapshot() for kv in self.mtp]

    def restore(self, saved: tuple[int, list, list[int]]) -> None:
        self.position, states, mtp_lengths = saved
        for layer, state in zip(self.layers, states):
            layer.restore(state)
        for kv, length in zip(self.mtp, mtp_lengths):
            kv.restore(length)

    def rewind(self, position: int, states: list[DeltaNetState | None]) -> None:
        """Go back to `position` inside the last verify pass: KV caches truncate, each DeltaNet layer takes
        the state the pass kept for that position (`states[i]` for layer i, None for attention layers).
        The kept states are taken, not copied: the pass made them for this and keeps no other reference."""
        self.position = position
        for layer, state in zip(self.layers, states):
            if state is None:
                layer.restore(position)
            else:
                layer.conv, layer.recurrent = state.conv, state.recurrent
