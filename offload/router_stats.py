"""Router statistics that outlive a run: which experts each layer picks, with what, and how often again.

The tiered expert cache needs to know, before a token arrives, which experts it will want: the
popular ones (to fill free slots at load), the ones layer L's choices make likely at layer L+1
(to prefetch while layer L computes), and how often token t's experts come back at t+1 (how much
a cache of the last token's experts saves). RouterStatistics is a routing observer
(qwen3next.moe.set_routing_observer) that counts exactly that, per model, and merges its counts
into one file per model identity under the user cache, so every run adds to what earlier and
concurrent runs learnt.

Counting is deferred: `routed` only queues the ids (a decode step reports once per layer, and a
few torch ops per report would cost more than the step's MoE); the queue is folded into the
counts in batches, with one set of tensor ops per layer however many tokens it holds.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
import threading
import time
from collections import defaultdict, deque
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

from qwen3next.checkpoint_names import checkpoint_identity
from qwen3next.config import Qwen3NextConfig
from qwen3next.errors import ConfigError
from qwen3next.model_path import user_cache
from qwen3next.weights import CheckpointReader, write_safetensors

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:
    msvcrt = None

FORMAT_VERSION = "1"
_IDENTITY = re.compile(r"[0-9a-f]{32}")
_NAMES = ("counts", "coactivation", "reuse", "tokens", "transitions")


def cache_folder() -> Path:
    """Where the statistics files live: $QWEN3NEXT_CACHE/router-stats, else ~/.cache/qwen3next/router-stats."""
    return user_cache() / "router-stats"


def model_identity(folder: str | os.PathLike) -> str:
    """A hash of config.json (less its `quantization` section) and the tensor names and shapes.

    The same model gets the same identity wherever its folder lives. A quantized folder records its
    source's identity (config.json quantization.source_identity) and returns that, so it shares the
    source's statistics.
    """
    folder = Path(folder)
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    section = config.pop("quantization", None)
    recorded = section.get("source_identity") if isinstance(section, dict) else None
    if recorded is not None:
        if not isinstance(recorded, str) or not _IDENTITY.fullmatch(recorded):
            raise ConfigError(f"{path}: quantization.source_identity {recorded!r} is not a model identity "
                              "(32 lowercase hex digits)")
        return recorded
    reader = CheckpointReader(folder)
    return checkpoint_identity(config, ((name, reader.shape(name)) for name in reader.names()))


def _warn(message: str) -> None:
    print(f"qwen3next: warning: {message}", file=sys.stderr, flush=True)


class _BadFile(Exception):
    """A statistics file that cannot be used: its message says what is wrong with it."""


class RouterStatistics:
    """Expert-usage counts of one model, accumulated in memory and merged into its file by save().

    Layer ids are the expert store's: main layers 0..main_layers-1, then the MTP layers. Counts
    (all int64): `counts` [layers, experts] times each expert was chosen; `coactivation`
    [main_layers - 1, experts, experts] tokens for which expert a at layer L and b at L+1 were both
    chosen (the MTP layer runs in a pass of its own, so it has none); `reuse` [layers, experts]
    times an expert chosen for token t was chosen again for t+1; `tokens` [layers] tokens routed;
    `transitions` [layers] (t, t+1) pairs seen, reuse's denominator. Rows reported to `routed` are
    one sequence's tokens in order, continued across calls until start_sequence().
    """

    fold_every = 4096  # queued reports folded into the counts at once

    def __init__(self, layers: int, experts: int, top_k: int, main_layers: int | None = None,
                 identity: str = "", path: Path | None = None, model: str = ""):
        self.layers, self.experts, self.top_k = layers, experts, top_k
        self.main_layers = layers if main_layers is None else main_layers
        self.identity, self.path, self.model = identity, path, model
        self._base = self._zeros()  # what the file held at the last load or save
        self._delta = self._zeros()  # counted here since then
        self._queue: deque = deque()  # (layer, ids) reports and None (a new sequence) not yet folded
        self._lock = threading.Lock()
        self._sequence = 0  # bumped by start_sequence(); a layer's row continues only within one
        self._previous: dict[int, tuple[int, torch.Tensor]] = {}  # layer -> (sequence, its last chunk)
        self._last_report: tuple[int, torch.Tensor] | None = None  # pairs layer L with L+1 across folds
        self._dirty = False
        self._saving = path is not None
        self._warned = False
        self._last_save = time.monotonic()

    @classmethod
    def for_model(cls, folder: str | os.PathLike, config: Qwen3NextConfig | None = None) -> "RouterStatistics":
        """The statistics of the model in `folder`, loaded from the cache (fresh if none or unusable)."""
        folder = Path(folder)
        config = config or Qwen3NextConfig.from_file(folder)
        identity = model_identity(folder)
        stats = cls(config.num_hidden_layers + config.num_nextn_predict_layers, config.num_experts,
                    config.num_experts_per_tok, config.num_hidden_layers, identity,
                    cache_folder() / f"{identity}.safetensors", folder.name)
        try:
            stats.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            stats._cannot_save(exc)
        stats.load()
        return stats

    def _zeros(self) -> dict[str, torch.Tensor]:
        L, E = self.layers, self.experts
        shapes = {"counts": (L, E), "coactivation": (max(self.main_layers - 1, 0), E, E), "reuse": (L, E),
                  "tokens": (L,), "transitions": (L,)}
        return {name: torch.zeros(shape, dtype=torch.int64) for name, shape in shapes.items()}

    # --- the observer -------------------------------------------------------------------------

    needs_hidden = False  # statistics need only the choices (so a whole-step kernel may run: whole_step.py)

    def before_routing(self, layer: int, x: torch.Tensor) -> None:
        """Statistics need only the choices."""

    def routed(self, layer: int, ids: torch.Tensor) -> None:
        self._queue.append((layer, ids))
        if len(self._queue) >= self.fold_every:
            self.fold()

    def start_sequence(self) -> None:
        """The next reported tokens begin a new text: token t+1 reuse does not link them to the last ones."""
        self._queue.append(None)

    def fold(self) -> None:
        """Add the queued reports to the counts: per layer, a handful of tensor ops over all its rows."""
        with self._lock:
            reports = [self._queue.popleft() for _ in range(len(self._queue))]
            if not reports:
                return
            chunks: dict[int, list[torch.Tensor]] = defaultdict(list)
            starts: dict[int, list[bool]] = defaultdict(list)  # per chunk: does it begin a sequence?
            carried: set[int] = set()  # layers whose chunks begin with the previous fold's last row
            pairs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
            last = self._last_report
            for report in reports:
                if report is None:
                    self._sequence += 1
                    last = None
                    continue
                layer, ids = report
                if ids.shape[0] == 0:
                    continue
                previous = self._previous.get(layer)
                continues = previous is not None and previous[0] == self._sequence
                if continues and not chunks[layer]:
                    chunks[layer].append(previous[1][-1:])  # for reuse only: it was counted in its own fold
                    starts[layer].append(True)
                    carried.add(layer)
                chunks[layer].append(ids)
                starts[layer].append(not continues)
                self._previous[layer] = (self._sequence, ids)
                if last is not None and last[0] == layer - 1 and layer < self.main_layers \
                        and last[1].shape[0] == ids.shape[0]:
                    pairs[layer - 1].append((last[1], ids))
                last = (layer, ids)
            self._last_report = last
            for layer, parts in chunks.items():
                self._count(layer, parts, starts[layer], layer in carried)
            for layer, both in pairs.items():
                a, b = (_on_cpu(side) for side in zip(*both))
                flat = (a[:, :, None] * self.experts + b[:, None, :]).flatten()
                self._delta["coactivation"][layer].view(-1).index_add_(0, flat, torch.ones_like(flat))
            self._dirty = True

    def _count(self, layer: int, parts: list[torch.Tensor], starts: list[bool], carried: bool) -> None:
        """Counts, tokens and t -> t+1 reuse of one layer's chunks (the first only for reuse when `carried`)."""
        rows = _on_cpu(parts)
        offsets = [0, *itertools.accumulate(part.shape[0] for part in parts)][:-1]
        first = torch.zeros(len(rows), dtype=torch.bool)  # rows with no predecessor in their sequence
        first[[offset for offset, start in zip(offsets, starts) if start]] = True
        new = rows[1:] if carried else rows
        delta = self._delta
        delta["counts"][layer] += torch.bincount(new.flatten(), minlength=self.experts)
        delta["tokens"][layer] += len(new)
        linked = ~first[1:]
        again = (rows[1:, :, None] == rows[:-1, None, :]).any(-1) & linked[:, None]
        delta["reuse"][layer] += torch.bincount(rows[1:][again], minlength=self.experts)
        delta["transitions"][layer] += int(linked.sum())

    # --- what was counted ---------------------------------------------------------------------

    def total(self, name: str) -> torch.Tensor:
        """One of the counts ("counts", "coactivation", "reuse", "tokens", "transitions"): saved plus unsaved."""
        self.fold()
        return self._base[name] + self._delta[name]

    @property
    def counts(self) -> torch.Tensor:
        return self.total("counts")

    @property
    def coactivation(self) -> torch.Tensor:
        return self.total("coactivation")

    @property
    def reuse(self) -> torch.Tensor:
        return self.total("reuse")

    @property
    def tokens(self) -> torch.Tensor:
        return self.total("tokens")

    @property
    def transitions(self) -> torch.Tensor:
        return self.total("transitions")

    # --- predictions for the prefetcher (from folded counts: no fold forced per call) ------------

    def hottest(self, layer: int, n: int) -> list[int]:
        """Up to n experts of `layer`, most used first (none before anything was counted)."""
        return _top(self._base["counts"][layer] + self._delta["counts"][layer], n)

    def predict_next_layer(self, layer: int, ids: Sequence[int] | torch.Tensor, n: int) -> list[int]:
        """The n experts of layer + 1 most often chosen together with `ids` at `layer`, most likely first.

        Filled up from layer + 1's popularity when the co-activation counts name fewer (or there are
        none: the last main layer, the MTP layer); empty when nothing was counted.
        """
        if not 0 <= layer < self.layers:
            raise IndexError(f"layer {layer} is not in 0..{self.layers - 1}")
        if layer + 1 >= self.layers:
            return []
        chosen: list[int] = []
        if layer + 1 < self.main_layers:
            rows = torch.as_tensor(ids).to("cpu", torch.int64).flatten()
            scores = (self._base["coactivation"][layer][rows] + self._delta["coactivation"][layer][rows]).sum(0)
            chosen = _top(scores, n)
        if len(chosen) < n:
            chosen += [e for e in self.hottest(layer + 1, n) if e not in chosen][: n - len(chosen)]
        return chosen

    # --- persistence --------------------------------------------------------------------------

    def load(self) -> None:
        """Replace the counts with the file's (a missing file: zeros; an unusable one: zeros and one warning)."""
        with self._lock:
            self._base = self._read() or self._zeros()
            self._delta = self._zeros()
            self._dirty = False

    def save(self) -> bool:
        """Merge the unsaved counts into the file (under a file lock, so concurrent runs all count).

        Afterwards the counts are the file's (this run's plus every other run's) and nothing is
        unsaved. Returns whether the file was written; a cache that cannot be written is reported
        once and then left alone.
        """
        self.fold()
        with self._lock:
            if not (self._saving and self._dirty):
                return False
            try:
                with _exclusive(self.path.with_name(self.path.name + ".lock")):
                    current = self._read() or self._zeros()
                    merged = {name: current[name] + self._delta[name] for name in _NAMES}
                    _write_atomically(self.path, merged, self._metadata())
            except OSError as exc:
                self._cannot_save(exc)
                return False
            self._base, self._delta = merged, self._zeros()
            self._dirty = False
            self._last_save = time.monotonic()
            return True

    def maybe_save(self, every_seconds: float = 300.0) -> bool:
        """save() when the last save (or the start) is at least every_seconds ago: for long-running processes."""
        if time.monotonic() - self._last_save < every_seconds:
            return False
        return self.save()

    def _metadata(self) -> dict[str, str]:
        return {"format_version": FORMAT_VERSION, "identity": self.identity, "layers": str(self.layers),
                "main_layers": str(self.main_layers), "experts": str(self.experts), "top_k": str(self.top_k),
                "model": self.model}

    def _read(self) -> dict[str, torch.Tensor] | None:
        """The file's counts, or None when it is missing or unusable (said once)."""
        if self.path is None or not self.path.exists():
            return None
        try:
            with open(self.path, "rb") as f:
                data = bytearray(os.fstat(f.fileno()).st_size)
                del data[f.readinto(data):]  # a file that shrank meanwhile
            return self._parse(data)
        except (OSError, _BadFile) as exc:
            if not self._warned:
                self._warned = True
                what = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                _warn(f"router statistics {self.path}: {what}; starting fresh")
            return None

    def _parse(self, data: bytearray) -> dict[str, torch.Tensor]:
        """The counts in a safetensors file's bytes, every header field checked before it is used.

        Parsed here rather than by safetensors.torch, which needs numpy (a plain install has none).
        """
        size = int.from_bytes(data[:8], "little")
        if len(data) < 8 or 8 + size > len(data) or size % 8:
            raise _BadFile(f"truncated or not a safetensors file ({len(data)} bytes, header of {size})")
        try:
            header = json.loads(data[8 : 8 + size])
        except ValueError as exc:
            raise _BadFile(f"not a safetensors file (header: {exc})") from None
        metadata = header.get("__metadata__") if isinstance(header, dict) else None
        if not isinstance(metadata, dict):
            raise _BadFile("not a router statistics file (no metadata)")
        if metadata.get("format_version") != FORMAT_VERSION:
            raise _BadFile(f"format version {metadata.get('format_version')!r}, expected {FORMAT_VERSION!r}")
        if metadata.get("identity") != self.identity:
            raise _BadFile(f"statistics of another model (identity {metadata.get('identity')!r}, "
                           f"expected {self.identity!r})")
        described = "{} layers ({} main), {} experts, top-{}"
        keys = ("layers", "main_layers", "experts", "top_k")
        if [metadata.get(key) for key in keys] != [str(getattr(self, key)) for key in keys]:
            raise _BadFile(f"counts for {described.format(*(metadata.get(key) for key in keys))}, "
                           f"expected {described.format(*(getattr(self, key) for key in keys))}")
        tensors = {}
        for name, zero in self._zeros().items():
            entry = header.get(name)
            expected = {"dtype": "I64", "shape": list(zero.shape)}
            if not isinstance(entry, dict) or {k: entry.get(k) for k in expected} != expected:
                found = "missing" if not isinstance(entry, dict) else f"{entry.get('dtype')} {entry.get('shape')}"
                raise _BadFile(f"tensor {name!r} is {found}, expected I64 {list(zero.shape)}")
            offsets = entry.get("data_offsets")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                    and offsets[0] >= 0 and offsets[0] % 8 == 0 and offsets[1] - offsets[0] == zero.numel() * 8):
                raise _BadFile(f"tensor {name!r} has data offsets {offsets!r}, "
                               f"expected {zero.numel() * 8} aligned bytes")
            start, stop = (8 + size + o for o in offsets)
            if stop > len(data):
                raise _BadFile(f"truncated ({len(data)} bytes; tensor {name!r} ends at byte {stop})")
            tensor = torch.frombuffer(data, dtype=torch.int64, count=zero.numel(), offset=start).view(zero.shape) \
                if zero.numel() else zero
            if bool((tensor < 0).any()):
                raise _BadFile(f"tensor {name!r} has negative counts")
            tensors[name] = tensor
        if not torch.equal(tensors["counts"].sum(1), tensors["tokens"] * self.top_k):
            raise _BadFile(f"counts do not add up to tokens x top_k ({self.top_k})")
        return tensors

    def _cannot_save(self, exc: OSError) -> None:
        if self._saving:
            self._saving = False
            _warn(f"router statistics {self.path}: cannot save ({exc.strerror or exc}); running without saving them")


def _on_cpu(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The parts (all on one device) concatenated as one int64 CPU tensor: one device copy, not one per part."""
    return torch.cat(parts).to("cpu", torch.int64)


def _top(scores: torch.Tensor, n: int) -> list[int]:
    """Indices of the n largest positive scores, largest first, ties by lower index."""
    values, order = torch.sort(scores, descending=True, stable=True)
    return [i for value, i in zip(values[:n].tolist(), order[:n].tolist()) if value > 0]


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on lock_path while the block runs (waits for other holders)."""
    with open(lock_path, "a+b") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file closes
            yield
        elif msvcrt is not None:
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)  # retries for 10 s, then OSError
            try:
                yield
            finally:
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            yield


def _write_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file written to a temporary name in the same folder, fsynced, renamed over `path`:
    readers see the old file or the new one, never half of one."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write_safetensors(temp, {name: t.contiguous() for name, t in tensors.items()}, metadata)
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
