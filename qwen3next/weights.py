"""Reading and writing checkpoints in the Hugging Face safetensors layout.

A model folder holds either one ``model.safetensors`` or shards named by
``model.safetensors.index.json``. The real model is far larger than RAM, so the reader
parses only the shard headers up front (struct + json, cheap, and precise about
truncation) and reads tensor data with pread into memory of its own, one tensor (or one
chunk of one) at a time: no memory map, whose touched pages would count against the
process. The writer streams: it holds one shard's worth of tensors and renames every file
into place only once it is complete. Neither needs numpy (a plain install has none):
tensor memory is handed to the OS as a ctypes buffer.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import shutil
import struct
from pathlib import Path, PureWindowsPath
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import torch

from .errors import CheckpointError, Qwen3NextError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_LISTED = 5  # names shown per category in a validate() message

# safetensors dtype strings -> torch; the float8 kinds only where this torch has them.
# Bit-packed F4/F6 are left out: their header shapes count elements, not bytes.
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
    "C64": torch.complex64,
}
for _name, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu"),
):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)
SAFETENSORS_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}  # and back


class _Entry(NamedTuple):
    """Where one tensor lives: enough to validate it or pread its bytes."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first data byte
    length: int


def _header_bytes(path: Path) -> tuple[bytes, int]:
    """A shard's first 8 + header-length bytes, and the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
            return prefix + f.read(min(header_len, size)), size
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _read_header(path: Path, prefetched: tuple[bytes, int] | None = None) -> dict[str, _Entry]:
    """Parse one shard's header and check it against the file size, reading no tensor data.

    `prefetched` (header bytes, file size) stands in for a file not on disk yet (fetched ahead by range request).
    """
    data, size = prefetched or _header_bytes(path)
    if len(data) < 8:
        raise CheckpointError(f"{path}: truncated ({size} bytes, shorter than the 8-byte header length)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if 8 + header_len > size or len(data) < 8 + header_len:
        raise CheckpointError(f"{path}: truncated (header claims {header_len} bytes, file has {size})")
    try:
        header = json.loads(data[8:8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    data_start = 8 + header_len
    entries = {name: _entry(path, name, info, data_start) for name, info in header.items() if name != "__metadata__"}
    end = max((e.start + e.length for e in entries.values()), default=data_start)
    if end > size:
        raise CheckpointError(f"{path}: truncated (tensor data ends at byte {end}, file has {size})")
    return entries


def _entry(path: Path, name: str, info: Any, data_start: int) -> _Entry:
    """One header record, checked for a known dtype and offsets that match the shape."""
    try:
        dtype_str, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        shape = tuple(int(d) for d in shape)
        begin, end = int(begin), int(end)
    except (TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}") from exc
    dtype = SAFETENSORS_DTYPES.get(dtype_str)
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype_str!r}")
    expected = math.prod(shape) * dtype.itemsize
    if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r} has data_offsets [{begin}, {end}] but {dtype_str}{list(shape)} needs {expected} bytes"
        )
    return _Entry(path, dtype, shape, data_start + begin, end - begin)


def _confined(folder: Path, name: str, index: Path) -> Path:
    """The path of a shard the index names, refusing any that could reach outside the model folder.

    Names are checked as text first (absolute, drive, "..") so a hostile index never makes us
    touch those paths; the resolved path is then checked to catch symlinks. A hub cache
    snapshot (``<repo>/snapshots/<rev>``) links its files into ``<repo>/blobs``, so that
    folder is allowed too.
    """
    if (
        not name
        or name.startswith(("/", "\\"))
        or PureWindowsPath(name).drive
        or ".." in re.split(r"[\\/]", name)
    ):
        raise CheckpointError(f"{index}: shard name {name!r} is outside the model folder")
    root = folder.resolve()
    roots = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    resolved = (root / name).resolve()
    if not any(resolved.is_relative_to(r) for r in roots):
        raise CheckpointError(f"{index}: shard {name!r} resolves to {resolved}, outside the model folder")
    return folder / name


def _read_index(index: Path) -> dict[str, str]:
    """The index's weight_map (tensor name -> shard file name)."""
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{index}: cannot read ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index}: not valid JSON ({exc})") from exc
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no weight_map object")
    if not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map values must be shard file names")
    return weight_map


def _shorten(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown + (f" ... and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


class CheckpointReader:
    """Lazy, tensor-by-tensor access to a folder of safetensors shards."""

    def __init__(self, folder: str | Path, prefetched: Mapping[str, tuple[bytes, int]] | None = None):
        """`prefetched`: shard file name -> (header bytes, file size) for shards not downloaded yet."""
        self.folder = Path(folder)
        self._prefetched = prefetched or {}
        if not self.folder.exists():
            raise CheckpointError(f"{self.folder}: model folder not found")
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a folder")
        single, index = self.folder / SINGLE_FILE, self.folder / INDEX_FILE
        if single.is_file() or SINGLE_FILE in self._prefetched:  # the hub's loaders also prefer the single file
            self._entries = _read_header(single, self._prefetched.get(SINGLE_FILE))
        elif index.is_file():
            self._entries = self._read_sharded(index)
        else:
            raise CheckpointError(f"{self.folder}: no {SINGLE_FILE} and no {INDEX_FILE}")

    def _read_sharded(self, index: Path) -> dict[str, _Entry]:
        weight_map = _read_index(index)
        shards = {name: _confined(self.folder, name, index) for name in sorted(set(weight_map.values()))}
        for name, path in shards.items():
            if not path.is_file() and name not in self._prefetched:
                raise CheckpointError(f"{index}: names shard {name!r}, which does not exist")
        headers = {name: _read_header(path, self._prefetched.get(name)) for name, path in shards.items()}
        entries = {}
        for tensor, shard in weight_map.items():
            entry = headers[shard].get(tensor)
            if entry is None:
                raise CheckpointError(f"{shards[shard]}: has no tensor {tensor!r}, which {index.name} places there")
            entries[tensor] = entry
        return entries

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.folder}: checkpoint has no tensor {name!r}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def file_of(self, name: str) -> Path:
        return self._entry(name).file

    def byte_range(self, name: str) -> tuple[Path, int, int]:
        """(file, absolute offset of the first byte, byte length): what a pread needs."""
        entry = self._entry(name)
        return entry.file, entry.start, entry.length

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read with pread into memory of its own."""
        return self.read_flat(name, 0, math.prod(self.shape(name))).view(self.shape(name))

    def read_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of tensor `name`, flattened: a chunk of a tensor too big to hold whole."""
        entry = self._entry(name)
        chunk = torch.empty(stop - start, dtype=entry.dtype)
        pread_into(entry.file, entry.start + start * entry.dtype.itemsize, chunk.view(torch.uint8),
                   what=f"tensor {name!r}")
        return chunk

    def validate(self, expected: dict[str, tuple[int, ...]], optional_prefixes: tuple[str, ...] = ()) -> None:
        """Check the tensor names and shapes against what the model needs, reporting all problems at once.

        Names under an optional prefix (the "mtp." head) may be absent, but if present they must be
        expected and the right shape.
        """
        missing = sorted(n for n in expected if n not in self._entries and not n.startswith(optional_prefixes))
        unexpected = sorted(n for n in self._entries if n not in expected)
        wrong = [
            f"{n}: got {self._entries[n].shape}, expected {tuple(expected[n])}"
            for n in sorted(expected)
            if n in self._entries and self._entries[n].shape != tuple(expected[n])
        ]
        problems = [
            f"{label} {len(items)} ({_shorten(items)})"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if items
        ]
        if problems:
            raise CheckpointError(f"{self.folder}: checkpoint does not match the model: {'; '.join(problems)}")

    def total_bytes(self) -> int:
        return sum(e.length for e in self._entries.values())

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Nothing to release: every read opens its shard for just that read."""


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's memory as a writable byte buffer, without numpy; the buffer keeps the tensor alive."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    buffer = (ctypes.c_char * tensor.nbytes).from_address(tensor.data_ptr())
    buffer.owner = tensor
    return memoryview(buffer).cast("B")


def pread_into(path: Path, offset: int, target: torch.Tensor, what: str = "data") -> None:
    """Fill a contiguous CPU tensor from `path` at byte `offset` with explicit reads (no memory map)."""
    view = tensor_bytes(target)
    try:
        with open(path, "rb", buffering=0) as f:
            while view:
                n = os.preadv(f.fileno(), [view], offset)
                if n <= 0:
                    raise CheckpointError(f"{path}: truncated while reading {what}")
                view, offset = view[n:], offset + n
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read {what} ({exc.strerror or exc})") from exc


def encode_header(tensors: Iterable[tuple[str, str, Sequence[int], int]], metadata: Mapping[str, str],
                  align: int = 8) -> tuple[bytes, list[int]]:
    """A safetensors header for (name, dtype string, shape, byte length) laid out back to back in that order.

    Returns the header's bytes (length prefix included) and each tensor's offset from the end of the
    header. The JSON is padded with spaces so data starts at a multiple of `align` (the format asks
    for 8; the quantized format for 64).
    """
    entries: dict[str, Any] = {"__metadata__": dict(metadata)}
    offsets, cursor = [], 0
    for name, dtype, shape, nbytes in tensors:
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + nbytes]}
        offsets.append(cursor)
        cursor += nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % align)
    return struct.pack("<Q", len(text)) + text, offsets


def _shards(tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """Group the stream into shards of at most max_shard_bytes (a bigger tensor gets a shard alone)."""
    shard: dict[str, torch.Tensor] = {}
    size, given = 0, set()
    for name, tensor in tensors:
        if name in given:
            raise ValueError(f"tensor {name!r} given twice")
        given.add(name)
        if shard and size + tensor.nbytes > max_shard_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = tensor.detach().to("cpu").contiguous()
        size += tensor.nbytes
    if shard or not given:
        yield shard


def write_safetensors(path: Path, shard: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """One safetensors file; wider dtypes first, as safetensors orders them, so every tensor is aligned."""
    order = sorted(shard, key=lambda name: (-shard[name].element_size(), name))
    for name in order:
        if shard[name].dtype not in SAFETENSORS_DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: safetensors has no dtype for {shard[name].dtype}")
    header, _ = encode_header(((name, SAFETENSORS_DTYPE_NAMES[shard[name].dtype], shard[name].shape,
                                shard[name].nbytes) for name in order), metadata)
    with open(path, "wb") as f:
        f.write(header)
        for name in order:
            f.write(tensor_bytes(shard[name]))


def write_checkpoint(
    folder: str | Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    max_shard_bytes: int = 5 * 2**30,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write tensors (consumed one at a time: do not hold them all) as shards + index in the HF layout.

    Like the hub: one shard becomes ``model.safetensors`` with no index; several become
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``. The shard count
    is unknown while streaming, so shards go to temporary names and are renamed at the end;
    checkpoint files of an earlier write that the new one does not replace are removed first,
    and the index is renamed last, so an interrupted write never looks complete.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    header_meta = {"format": "pt", **(metadata or {})}
    temps: list[Path] = []
    shard_names: list[list[str]] = []
    total = 0
    try:
        for shard in _shards(tensors, max_shard_bytes):
            temp = folder / f".shard-{len(temps) + 1:05d}.{os.getpid()}.tmp"
            temps.append(temp)
            write_safetensors(temp, shard, header_meta)
            shard_names.append(sorted(shard))
            total += sum(t.nbytes for t in shard.values())
            shard.clear()  # release this shard's tensors before the next shard is gathered
    except BaseException:
        for temp in temps:
            temp.unlink(missing_ok=True)
        raise
    return _finish(folder, temps, shard_names, total)


def _finish(folder: Path, temps: list[Path], shard_names: list[list[str]], total: int) -> list[Path]:
    """Move the complete temporary shards (and a new index) into place, dropping stale checkpoint files."""
    n = len(temps)
    finals = [folder / SINGLE_FILE] if n == 1 else [folder / f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    keep = {p.name for p in finals} | ({INDEX_FILE} if n > 1 else set())
    for old in folder.iterdir():
        stale = old.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_NAME.fullmatch(old.name)
        if stale and old.name not in keep:
            old.unlink()
    for temp, final in zip(temps, finals):
        os.replace(temp, final)
    if n > 1:
        write_index(folder, {name: final.name for final, names in zip(finals, shard_names) for name in names}, total)
    return finals


def write_index(folder: Path, weight_map: Mapping[str, str], total_size: int) -> None:
    """model.safetensors.index.json as the hub writes it (names sorted), renamed into place once complete."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    temp = folder / f".index.{os.getpid()}.tmp"
    temp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    os.replace(temp, folder / INDEX_FILE)


def format_bytes(n: int) -> str:
    """Decimal units, as the hub shows file sizes."""
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def free_bytes(folder: Path) -> int:
    """Free bytes on the file system that holds `folder`, or will hold it (its nearest existing parent)."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    return shutil.disk_usage(existing).free


def check_free_space(folder: Path, needed: int, where: str | Path, what: str, after: str = "") -> int:
    """Refuse, before anything is written, when `needed` bytes do not fit where `folder` is; returns the free bytes.

    The message reads "{where}: not enough disk space: {what} {needed}{after}, {free} free".
    """
    free = free_bytes(folder)
    if needed > free:
        raise Qwen3NextError(f"{where}: not enough disk space: {what} {format_bytes(needed)}{after}, "
                             f"{format_bytes(free)} free")
    return free
