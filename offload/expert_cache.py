"""Where routed experts live: fixed-size RAM slots filled from the checkpoint, under an eviction policy.

Placement only: the cache hands the MoE block an address table in which the experts it asked for
are resident (`acquire`), and the compute (offload/quantized_experts.py) runs exactly the kernels the
fully resident case runs, in the router's order, so where an expert came from cannot change a bit
of the result. Reads run in the background (offload/disk.py); `prefetch` starts them ahead of need
(the prefetcher decides what), `acquire` waits only for what is still missing.

Slots are one contiguous arena of equal-sized buffers, one expert each: a quantized folder's expert
is one contiguous blob (one read), a bf16 folder's is its gate, up and down matrices (three reads,
laid end to end in the slot). Every step needs one token's top-k experts at once, so the arena never has fewer
slots than that: those are the read buffers, and a budget that holds no more still runs, reading
every expert from disk. Eviction is global across layers (a layer with more distinct experts in
use keeps more of them); the policy scores slots (lowest score goes first):
  lru    least recently used
  lfu    fewest uses (ties: least recent)
  stats  fewest uses plus the expert's long-run share from the router statistics, so a cold start
         keeps the experts the statistics say are hot (the default)
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import torch

from .disk import DEMAND, PREFETCH, BlobReader

POLICIES = ("lru", "lfu", "stats")
_STATS_WEIGHT = 8.0  # how many uses an expert's long-run share (1.0 = the layer's busiest) is worth


Range = tuple[Path, int, int]  # (file, offset, length)


@dataclass(frozen=True)
class LayerSource:
    """Where one layer's experts are on disk: per expert, the ranges its slot holds end to end (one blob for
    a quantized folder; gate, up and down for bf16). Every expert of a layer has the same piece lengths."""

    pieces: tuple[tuple[Range, ...], ...]

    @property
    def offsets(self) -> tuple[int, ...]:
        """Where each piece starts inside a slot."""
        lengths = [length for _, _, length in self.pieces[0]]
        return tuple(sum(lengths[:i]) for i in range(len(lengths)))

    @property
    def nbytes(self) -> int:
        return sum(length for _, _, length in self.pieces[0])


@dataclass
class CacheCounters:
    """What --stats reports: a hit is an expert resident when its layer computes."""

    hits: int = 0
    misses: int = 0
    late: int = 0  # prefetched, but the read had not finished when the layer needed it (counted as misses)
    prefetched: int = 0  # reads started by prefetch
    prefetch_used: int = 0  # of those, experts later acquired before being evicted
    prefetch_hits: int = 0  # acquired experts that were there only because prefetch read them in time
    stall_seconds: float = 0.0  # time acquire() waited for reads
    evictions: int = 0
    disk_bytes: int = 0  # read from the checkpoint

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 1.0

    @property
    def prefetch_precision(self) -> float:
        return self.prefetch_used / self.prefetched if self.prefetched else 0.0

    @property
    def prefetch_recall(self) -> float:
        """Of the experts not left resident by earlier steps, the share prefetch delivered in time."""
        return self.prefetch_hits / (self.prefetch_hits + self.misses) if self.prefetch_hits + self.misses else 0.0

    def figures(self, tokens: int) -> dict[str, float]:
        """What --stats and --stats-json report for a request that generated `tokens`."""
        return {"hit_rate": self.hit_rate, "hits": self.hits, "misses": self.misses, "late_prefetches": self.late,
                "evictions": self.evictions, "disk_bytes": self.disk_bytes,
                "disk_bytes_per_token": self.disk_bytes / max(tokens, 1), "prefetch_precision": self.prefetch_precision,
                "prefetch_recall": self.prefetch_recall, "stall_seconds": self.stall_seconds}

    def minus(self, earlier: "CacheCounters") -> "CacheCounters":
        """The counts since `earlier` (a copy taken then): what one request did."""
        return CacheCounters(**{f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)})


class ExpertCache:
    """Routed experts in RAM slots. `tables[layer]` [experts, pieces] int64 holds each resident expert's
    piece addresses (0 when absent): the kernels index it by expert id."""

    def __init__(self, sources: dict[int, LayerSource], slots: int, min_slots: int, reader: BlobReader,
                 policy: str = "stats", priors: dict[int, torch.Tensor] | None = None):
        if policy not in POLICIES:
            raise ValueError(f"eviction policy {policy!r} is not one of {', '.join(POLICIES)}")
        self.sources, self.reader, self.policy = sources, reader, policy
        self.layers = list(sources)
        self.experts = len(next(iter(sources.values())).pieces)
        self.slot_count = min(self.experts * len(sources), max(slots, min_slots))
        self.slot_bytes = max(s.nbytes for s in sources.values())
        self.arena = torch.empty(self.slot_count, self.slot_bytes, dtype=torch.uint8)
        self._base = self.arena.data_ptr()
        self._offsets = {layer: torch.tensor(s.offsets, dtype=torch.int64) for layer, s in sources.items()}
        self.tables = {layer: torch.zeros(self.experts, len(s.offsets), dtype=torch.int64)
                       for layer, s in sources.items()}
        self.slot_of = {layer: [-1] * self.experts for layer in self.layers}
        self.owner: list[tuple[int, int] | None] = [None] * self.slot_count
        self.vacant = torch.ones(self.slot_count, dtype=torch.bool)
        self.pending: dict[int, list[Future]] = {}  # slot -> its reads in flight (one per piece)
        self.prefetched_slots: set[int] = set()
        self.pinned = torch.zeros(self.slot_count, dtype=torch.bool)
        self.last_used = torch.zeros(self.slot_count, dtype=torch.float64)
        self.uses = torch.zeros(self.slot_count, dtype=torch.float64)
        self.prior = torch.zeros(self.slot_count, dtype=torch.float64)  # the stats policy's share of the owner
        self.priors = priors or {}
        self.clock = 0.0
        self.counters = CacheCounters()
        self.complete = False  # every expert resident: acquire() has nothing to do

    # -- placement -------------------------------------------------------------------------------

    def fill(self, order: dict[int, Sequence[int]] | None = None, wait: bool = True, progress=lambda n: None) -> None:
        """Fill free slots, hottest first (`order`: per layer, experts by preference; default: id order),
        round-robin over layers so every layer gets its share. With every expert fitting, the cache is
        complete and later steps read nothing."""
        queues = {layer: [e for e in (order or {}).get(layer, range(self.experts)) if self.slot_of[layer][e] < 0]
                  for layer in self.layers}
        free = self.vacant.nonzero().flatten().tolist()[::-1]  # reversed: pop() hands out low slots first
        while free and any(queues.values()):
            for layer in self.layers:
                if queues[layer] and free:
                    self._start_read(free.pop(), layer, queues[layer].pop(0))
        if wait:
            for slot in list(self.pending):
                self._finish(slot)
                progress(1)
        self.complete = all(min(self.slot_of[layer]) >= 0 for layer in self.layers)

    def acquire(self, layer: int, experts: Sequence[int]) -> None:
        """Make `experts` of `layer` resident and pinned (a hit when already read); waits for missing reads."""
        if self.complete:
            self.counters.hits += len(experts)
            return
        self.clock += 1
        self._publish_landed()
        missing = []
        for e in experts:
            slot = self.slot_of[layer][e]
            if slot >= 0 and slot not in self.pending:
                self.counters.hits += 1
                self.counters.prefetch_hits += slot in self.prefetched_slots
            else:
                self.counters.misses += 1
                if slot >= 0:
                    self.counters.late += 1
                    self._hurry(slot, layer, e)
                else:
                    missing.append(e)
            if slot >= 0:
                self._use(slot)
        if missing:
            for e, slot in zip(missing, self._victims(layer, len(missing))):
                self._start_read(slot, layer, e)
                self._use(slot)
        started = time.perf_counter()
        for e in experts:
            slot = self.slot_of[layer][e]
            if slot in self.pending:
                self._finish(slot)
        self.counters.stall_seconds += time.perf_counter() - started

    def release(self, layer: int, experts: Sequence[int]) -> None:
        if self.complete:
            return
        for e in experts:
            self.pinned[self.slot_of[layer][e]] = False

    def prefetch(self, layer: int, experts: Sequence[int], keep: Sequence[tuple[int, int]] = ()) -> None:
        """Start background reads of the experts of `layer` that are not resident, into evictable slots, sparing
        the resident experts in `keep` ((layer, expert) pairs the caller expects to be used soon: the policies
        score an unused prefetched expert lowest, so one prefetch would otherwise evict the last one's)."""
        if self.complete or layer not in self.slot_of:
            return
        wanted = [e for e in dict.fromkeys(experts) if self.slot_of[layer][e] < 0]
        if not wanted:
            return
        self._publish_landed()  # a landed wrong guess is evictable
        spared = [slot for slot in (self.slot_of[kept_layer][e] for kept_layer, e in keep) if slot >= 0]
        victims = self._victims(layer, len(wanted), strict=False, spared=spared)
        for e, slot in zip(wanted, victims):
            self._start_read(slot, layer, e, PREFETCH)
            self.prefetched_slots.add(slot)
            self.counters.prefetched += 1

    def view(self, layer: int, expert: int) -> torch.Tensor:
        """The resident bytes of an acquired expert (a view into the arena)."""
        return self.arena[self.slot_of[layer][expert], : self.sources[layer].nbytes]

    def close(self) -> None:
        for slot in list(self.pending):
            for read in self.pending.pop(slot):
                read.cancel()
        self.reader.close()

    # -- internals -------------------------------------------------------------------------------

    def _use(self, slot: int) -> None:
        self.pinned[slot] = True
        self.last_used[slot] = self.clock
        self.uses[slot] += 1
        if slot in self.prefetched_slots:
            self.prefetched_slots.discard(slot)
            self.counters.prefetch_used += 1

    def _score(self) -> torch.Tensor:
        if self.policy == "lru":
            return self.last_used.clone()
        tie = self.last_used / (self.clock + 1)  # in [0, 1): recency breaks ties between equal counts
        if self.policy == "lfu":
            return self.uses + tie
        return self.uses + _STATS_WEIGHT * self.prior + tie

    def _victims(self, layer: int, n: int, strict: bool = True, spared: Sequence[int] = ()) -> list[int]:
        """n slots to (re)use for `layer`: free ones first, then the policy's lowest scores among slots that
        are neither pinned, being read nor spared. strict: the caller needs all n (acquire); else as many as
        there are."""
        candidates = self._evictable(spared)
        if len(candidates) < n and strict and self.pending:
            for slot in list(self.pending):  # prefetches hold the slots the step needs: let them land first
                self._finish(slot)
            candidates = self._evictable()
        if len(candidates) < n and strict:
            raise RuntimeError(f"expert cache: {n} slots needed for layer {layer}, {len(candidates)} evictable")
        vacant = self.vacant[candidates]
        free = candidates[vacant][:n].tolist()
        if len(free) < n:
            occupied = candidates[~vacant]
            score = self._score()[occupied]
            free += occupied[torch.argsort(score, stable=True)[: n - len(free)]].tolist()
        return free

    def _evictable(self, spared: Sequence[int] = ()) -> torch.Tensor:
        evictable = ~self.pinned
        if self.pending:
            evictable[list(self.pending)] = False
        if spared:
            evictable[list(spared)] = False
        return evictable.nonzero().flatten()

    def _start_read(self, slot: int, layer: int, expert: int, priority: int = DEMAND) -> None:
        previous = self.owner[slot]
        if previous is not None:
            old_layer, old_expert = previous
            self.slot_of[old_layer][old_expert] = -1
            self.tables[old_layer][old_expert] = 0
            self.counters.evictions += 1
            self.prefetched_slots.discard(slot)
        self.owner[slot] = (layer, expert)
        self.vacant[slot] = False
        self.slot_of[layer][expert] = slot
        self.uses[slot] = 0
        self.last_used[slot] = self.clock
        prior = self.priors.get(layer)
        self.prior[slot] = float(prior[expert]) if prior is not None else 0.0
        self.counters.disk_bytes += self.sources[layer].nbytes
        self.pending[slot] = [self._submit(slot, layer, expert, piece, priority)
                              for piece in range(len(self.sources[layer].offsets))]

    def _submit(self, slot: int, layer: int, expert: int, piece: int, priority: int) -> Future:
        path, offset, length = self.sources[layer].pieces[expert][piece]
        start = self.sources[layer].offsets[piece]
        return self.reader.submit(path, offset, length, self.arena[slot, start:start + length],
                                  f"expert {expert} of layer {layer}", priority)

    def _publish_landed(self) -> None:
        """Every read that has finished goes into the address table: its expert is resident (a hit when acquired),
        and evictable again (a failed read raises its CheckpointError here)."""
        for slot in [slot for slot, reads in self.pending.items() if all(read.done() for read in reads)]:
            self._finish(slot)

    def _hurry(self, slot: int, layer: int, expert: int) -> None:
        """A prefetch the step now waits for: the reads not yet started go again at demand priority."""
        reads = self.pending[slot]
        for piece, read in enumerate(reads):
            if read.cancel():
                reads[piece] = self._submit(slot, layer, expert, piece, DEMAND)

    def _finish(self, slot: int) -> None:
        """Wait for a slot's reads; only then does its expert appear in the address table."""
        reads = self.pending.pop(slot)
        try:
            for read in reads:
                read.result()
        except BaseException:
            layer, expert = self.owner[slot]
            self.owner[slot] = None
            self.vacant[slot] = True
            self.slot_of[layer][expert] = -1
            raise
        layer, expert = self.owner[slot]
        self.tables[layer][expert] = self._base + slot * self.slot_bytes + self._offsets[layer]
