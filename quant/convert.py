"""`qwen3next quantize`: stream a bf16/fp16/fp32 checkpoint into the quantized format, shard by shard.

Memory stays bounded by the chunk size, not the model: source rows are read with pread in chunks of
CHUNK_BYTES (no memory map, whose touched pages would count against the process), quantized, and
written with pwrite straight to their planned offsets (quant/plan.py knows every offset before the
first byte is read). Everything is assembled in a hidden staging folder beside OUT; each shard is
written under a temporary name and renamed when complete, so a killed run resumes at the first
unfinished shard, and the staging folder becomes OUT only when config.json, the index and the
carried tokenizer files are in place. The computation is deterministic, so a resumed result is
byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from qwen3next.config import Qwen3NextConfig
from qwen3next.errors import CheckpointError, Qwen3NextError, UsageError
from qwen3next.weights import INDEX_FILE, CheckpointReader, check_free_space, tensor_bytes, write_index

from . import int4, int8
from .plan import Expert, Kept, Matrix, QuantizationPlan, ShardPlan, build_plan
from .policy import Policy

CHUNK_BYTES = 16 << 20  # source bytes quantized at a time
_JOB_FILE = "job.json"
_NOT_CARRIED = {"config.json", INDEX_FILE}


@dataclass
class TensorError:
    """Relative RMS error of one stored matrix against its source: sqrt(sum (w - w_q)^2 / sum w^2)."""

    name: str
    bits: int
    relative_error: float


def quantize_checkpoint(src: str | Path, out: str | Path, policy: Policy, group: int = int4.DEFAULT_GROUP,
                        force: bool = False, progress: bool = True, measure: bool = False,
                        say: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> list[TensorError]:
    """Quantize SRC into OUT. Returns per-matrix errors when `measure` (for --verify), else []."""
    src, out = Path(src), Path(out)
    check_paths(src, out, force)
    config = Qwen3NextConfig.from_file(src)
    with CheckpointReader(src) as reader:
        job = Conversion(src, out, reader, config, policy, group, measure, say)
        with job.progress_bar(progress) as bar:
            for shard in job.plan.shards:
                job.convert(shard, bar.update)
    job.finish(force)
    return job.errors


class Conversion:
    """One quantization job: its plan, the staging folder it resumes from, and the errors it measured.

    `source_sizes` (shard name -> bytes) identifies the source for resuming; it defaults to the
    shard files' sizes, and `download --quantize` passes the hub's before the files arrive.
    """

    def __init__(self, src: Path, out: Path, reader: CheckpointReader, config: Qwen3NextConfig, policy: Policy,
                 group: int, measure: bool, say: Callable[[str], None], source_sizes: dict[str, int] | None = None):
        self.src, self.out, self.reader, self.policy, self.group, self.measure = src, out, reader, policy, group, measure
        self.plan = build_plan(src, reader, config, policy, group)
        self.staging = out.parent / f".{out.name}.partial"
        sizes = source_sizes or {shard.name: shard.source.stat().st_size for shard in self.plan.shards}
        job = {"format_version": 1, "group": group, **policy.describe(),
               "source": [[shard.name, sizes[shard.name]] for shard in self.plan.shards]}
        _prepare_staging(self.staging, job, say)
        self.todo = [s for s in self.plan.shards if not _is_finished(self.staging / s.name, s)]
        check_free_space(self.staging, sum(s.size for s in self.todo), out.parent, "the quantized shards need")
        if len(self.todo) < len(self.plan.shards):
            say(f"resuming: {len(self.plan.shards) - len(self.todo)} of {len(self.plan.shards)} shards already done")
        self.errors: list[TensorError] = []

    def progress_bar(self, enabled: bool) -> tqdm:
        total = sum(s.source_bytes() for s in self.plan.shards)
        done = total - sum(s.source_bytes() for s in self.todo)
        return tqdm(total=total, initial=done, unit="B", unit_scale=True, desc="quantizing", disable=not enabled,
                    file=sys.stderr, dynamic_ncols=True)

    def convert(self, shard: ShardPlan, advance: Callable[[int], None] = lambda n: None) -> None:
        """Write one output shard (or, if an earlier run finished it, collect the errors it measured)."""
        if shard in self.todo:
            self.errors += ShardWriter(self.reader, shard, self.staging, self.measure, advance).write()
            self.todo.remove(shard)
        elif self.measure:
            self.errors += _read_errors(self.staging / shard.name)

    def finish(self, force: bool) -> None:
        _finish(self.src, self.out, self.staging, self.plan, self.policy, self.group, force)


def check_paths(src: Path, out: Path, force: bool) -> None:
    src_real, out_real = src.resolve(), out.resolve()
    if not src.is_dir():
        raise UsageError(f"{src}: SRC is not a model folder" if src.exists() else f"{src}: SRC not found")
    if out_real == src_real or src_real in out_real.parents:
        raise UsageError(f"{out}: OUT is inside SRC; choose a folder outside the source checkpoint")
    if out_real in src_real.parents:
        raise UsageError(f"{out}: OUT contains SRC; choose a folder that does not hold the source checkpoint")
    check_output(out, force)


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: OUT exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"{out}: OUT exists and is not empty (use --force to replace it)")


def _prepare_staging(staging: Path, job: dict, say: Callable[[str], None]) -> None:
    """Reuse a staging folder left by the same job (resume); clear one left by different settings."""
    job_file = staging / _JOB_FILE
    if staging.is_dir():
        try:
            same = json.loads(job_file.read_text(encoding="utf-8")) == job
        except (OSError, ValueError):
            same = False
        if same:
            return
        say(f"{staging}: left by a run with other settings or another source; starting over")
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    job_file.write_text(json.dumps(job, indent=1) + "\n", encoding="utf-8")


def _is_finished(path: Path, shard: ShardPlan) -> bool:
    """Shards are renamed into place only once complete, at exactly their planned size."""
    return path.is_file() and path.stat().st_size == shard.size


class ShardWriter:
    """Writes one planned shard: header first, then every tensor at its offset, then rename."""

    def __init__(self, reader: CheckpointReader, shard: ShardPlan, staging: Path, measure: bool,
                 advance: Callable[[int], None]):
        self.reader, self.shard, self.measure, self.advance = reader, shard, measure, advance
        self.final = staging / shard.name
        self.temp = staging / f".{shard.name}.tmp"
        self.errors: list[TensorError] = []

    def write(self) -> list[TensorError]:
        self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            os.ftruncate(self.fd, self.shard.size)  # padding inside blobs stays zero
            self._pwrite(self.shard.header, 0)
            for item in self.shard.items:
                self._write_item(item)
            os.fsync(self.fd)
        except OSError as exc:
            self._abandon()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise Qwen3NextError(f"{self.temp.parent}: disk full while writing {self.shard.name}; free "
                                     "space and run the same command again to resume") from None
            raise Qwen3NextError(f"{self.temp}: cannot write ({exc.strerror or exc})") from None
        except BaseException:
            self._abandon()
            raise
        os.close(self.fd)
        if self.measure:
            _write_errors(self.final, self.errors)
        os.replace(self.temp, self.final)
        return self.errors

    def _abandon(self) -> None:
        os.close(self.fd)
        self.temp.unlink(missing_ok=True)

    def _write_item(self, item) -> None:
        if isinstance(item, Kept):
            self._copy(item)
        elif isinstance(item, Matrix):
            self._quantize(item.name, item.bits, item.group, [t.offset for t in item.outputs])
        else:
            assert isinstance(item, Expert)
            blob = item.outputs[0].offset
            for projection, source in item.sources.items():
                p = item.layout.projections[projection]
                self._quantize(source, p.bits, p.group, [blob + o for o in p.offsets])
        self.advance(item.source_bytes)

    def _quantize(self, name: str, bits: int, group: int, offsets: list[int]) -> None:
        """Quantize `name` in row chunks; array i of the format goes to offsets[i] (row-major, so chunks append)."""
        rows, cols = self.reader.shape(name)
        dtype = self.reader.dtype(name)
        chunk_rows = max(1, CHUNK_BYTES // (cols * dtype.itemsize))
        squared_error = squared = 0.0
        for start in range(0, rows, chunk_rows):
            stop = min(rows, start + chunk_rows)
            w = self.reader.read_flat(name, start * cols, stop * cols).view(stop - start, cols).float()
            arrays = int8.quantize(w) if bits == 8 else int4.quantize(w, group)
            if not all(torch.isfinite(a).all() for a in arrays[1:]):  # a NaN or Inf reaches its group's scale
                self._non_finite(name)
            for offset, array in zip(offsets, arrays):
                row_bytes = array.nbytes // (stop - start)
                self._pwrite(tensor_bytes(array.contiguous()), offset + start * row_bytes)
            if self.measure:
                back = int8.dequantize(*arrays, torch.float32) if bits == 8 else int4.dequantize(*arrays, torch.float32)
                squared_error += (back - w).double().pow(2).sum().item()
                squared += w.double().pow(2).sum().item()
        if self.measure:
            self.errors.append(TensorError(name, bits, (squared_error / squared) ** 0.5 if squared else 0.0))

    def _copy(self, item: Kept) -> None:
        dtype = self.reader.dtype(item.name)
        count = item.source_bytes // dtype.itemsize
        step = max(1, CHUNK_BYTES // dtype.itemsize)
        target = item.outputs[0].offset
        for start in range(0, count, step):
            values = self.reader.read_flat(item.name, start, min(count, start + step))
            if dtype.is_floating_point and not torch.isfinite(values).all():
                self._non_finite(item.name)
            self._pwrite(tensor_bytes(values), target + start * dtype.itemsize)

    def _non_finite(self, name: str) -> None:
        raise CheckpointError(f"{self.reader.file_of(name)}: tensor {name} holds NaN or Inf values; "
                              "nothing was written for it")

    def _pwrite(self, view: memoryview | bytes, offset: int) -> None:
        view = memoryview(view)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written


def _write_errors(shard: Path, errors: list[TensorError]) -> None:
    sidecar = shard.with_name(f".{shard.name}.errors.json")
    sidecar.write_text(json.dumps([e.__dict__ for e in errors]), encoding="utf-8")


def _read_errors(shard: Path) -> list[TensorError]:
    """Errors measured when a shard was written by an earlier (interrupted) run, if it measured them."""
    try:
        return [TensorError(**e) for e in json.loads(shard.with_name(f".{shard.name}.errors.json").read_text())]
    except (OSError, ValueError):
        return []


def _finish(src: Path, out: Path, staging: Path, plan: QuantizationPlan, policy: Policy, group: int,
            force: bool) -> None:
    """Index, config.json and carried files into the staging folder, then the staging folder becomes OUT."""
    if plan.sharded:
        write_index(staging, {t.name: shard.name for shard in plan.shards for t in shard.tensors()},
                    sum(t.nbytes for shard in plan.shards for t in shard.tensors()))
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config["quantization"] = plan.config_section(policy, group)
    # the staging folder becomes OUT only after this, so a cut write is never seen (and is redone on resume)
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.name.startswith(".") and not path.name.endswith(".safetensors") \
                and path.name not in _NOT_CARRIED:
            shutil.copyfile(path, staging / path.name)
    for leftover in staging.glob(".*"):  # the job file and measured errors
        leftover.unlink()
    (staging / _JOB_FILE).unlink(missing_ok=True)
    if out.exists():
        if force and any(out.iterdir()):
            trash = out.parent / f".{out.name}.replaced"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(out, trash)
            os.replace(staging, out)
            shutil.rmtree(trash)
            return
        out.rmdir()  # empty: nothing to lose
    os.replace(staging, out)
