"""Bandwidth-bound decode kernels (csrc/*.c), built at model load, with a torch fallback.

Why our own: at decode every linear layer is a matrix-vector product, bound by reading the
weights. torch's bf16 path on CPU reaches about a third of the read bandwidth there; a plain C
loop compiled for the host reaches most of it (figures in docs/performance.md). The source is
compiled once per machine with the system C compiler into a cache folder and loaded with
ctypes. Without a compiler, or with QWEN3NEXT_NO_KERNELS=1, everything runs through torch:
same results to bf16 rounding, just slower, and a one-line notice on stderr says so.

`prepare()` builds and loads the library (call it at model load: a first build takes seconds);
`library()` prepares on first use for direct callers. QWEN3NEXT_KERNEL_CFLAGS appends compiler
flags (part of the cache key), so CI can build the paths its machine would not pick:
"-mno-avx512f" for AVX2, "-mno-avx" for the portable loops.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import itertools
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from .model_path import user_cache

CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(CSRC / name for name in ("decode_kernels.c", "quant_kernels.c", "layer_kernels.c",
                                          "build_info.c"))  # all include common.h
NO_KERNELS = "QWEN3NEXT_NO_KERNELS"
EXTRA_CFLAGS = "QWEN3NEXT_KERNEL_CFLAGS"
SLOWER = "running the torch fallback, decode is several times slower"
# Tried in order: vector expf from glibc's libmvec, then without it, then without OpenMP or -march.
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-DQ3N_LIBMVEC", "-lmvec"],
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3"],
)


class KernelMismatch(RuntimeError):
    """The library's structs disagree with their ctypes mirrors here: calling it would corrupt memory."""


@dataclasses.dataclass(frozen=True)
class KernelStatus:
    """What runs the CPU fast paths: a loaded library (isa set) or the torch fallback (reason set).

    `notice` is what the user is told once on stderr (also for a working library, e.g. a cache
    that could not be written); `describe()` is the short form for --stats.
    """

    isa: str | None = None  # the widest vector path compiled in, as the library reports it
    threaded: bool = False  # built with OpenMP
    path: Path | None = None
    reason: str = ""  # why there is no library
    notice: str = ""

    def describe(self) -> str:
        if self.isa is None:
            return f"torch fallback ({self.reason})"
        return f"C kernels ({self.isa}{'' if self.threaded else ', one thread: built without OpenMP'})"


def _cache_dir() -> Path:
    return user_cache() / "kernels"


def cpu_signature() -> str:
    """What -march=native depends on: the machine and its CPU flags."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _candidates() -> list[tuple[list[str], Path]]:
    """Each flag set (QWEN3NEXT_KERNEL_CFLAGS appended) with the cache path its library has."""
    extra = shlex.split(os.environ.get(EXTRA_CFLAGS, ""))
    source = b"".join(path.read_bytes() for path in (*SOURCES, CSRC / "common.h"))
    out = []
    for flags in _FLAG_SETS:
        flags = flags + extra
        key = hashlib.sha256(source + " ".join(flags).encode() + cpu_signature().encode()).hexdigest()[:16]
        out.append((flags, _cache_dir() / f"decode_kernels-{key}.so"))
    return out


def _compiler() -> str | None:
    return next(filter(None, map(shutil.which, (os.environ.get("CC") or "cc", "gcc", "clang"))), None)


def _open(quiet: bool) -> tuple[ctypes.CDLL | None, KernelStatus]:
    """The library from the cache, else freshly built; or None and why not."""
    if os.environ.get(NO_KERNELS, "") not in ("", "0"):
        return None, KernelStatus(reason=f"{NO_KERNELS}=1", notice=f"{NO_KERNELS}=1: running the torch path by request")
    candidates = _candidates()
    # The best flag set already cached wins, so a set that never compiles here is not retried every run.
    for flags, path in candidates:
        if path.exists():
            try:
                return _load(path)
            except OSError:  # corrupt or stale (a missing symbol): rebuilt below
                with contextlib.suppress(OSError):
                    path.unlink()
    compiler = _compiler()
    if compiler is None:
        asked = f"CC={os.environ['CC']} is not on PATH, nor are" if os.environ.get("CC") else "none of"
        return None, KernelStatus(reason="no C compiler", notice=(
            f"no C compiler found ({asked} cc, gcc, clang; install gcc or set CC); {SLOWER}"))
    if not quiet:
        _say(f"compiling CPU kernels for this machine (once; cached in {candidates[0][1].parent})")
    problem = ""
    for flags, path in candidates:
        library, status, problem = _build(compiler, flags, path)
        if library is not None:
            return library, status
    remedy = f"check {EXTRA_CFLAGS}" if os.environ.get(EXTRA_CFLAGS) else "set CC to a working compiler"
    return None, KernelStatus(reason="kernel build failed", notice=(
        f"the CPU kernels did not build with {compiler} ({problem}; {remedy}, or {NO_KERNELS}=1 to skip "
        f"the build); {SLOWER}"))


def _build(compiler: str, flags: list[str], target: Path) -> tuple[ctypes.CDLL | None, KernelStatus | None, str]:
    """Compile and load in a temporary folder, then install into the cache (renamed into place, so a
    half-written library is never loaded; the loaded mapping outlives the folder). A cache that cannot
    be written costs a rebuild next run, nothing else. Returns (library, status, "") or (None, None, why)."""
    try:
        folder = Path(tempfile.mkdtemp(prefix="qwen3next-kernels-"))
    except OSError as exc:
        return None, None, f"no temporary folder to build in: {exc}"
    try:
        built = folder / target.name
        command = [compiler, *flags, "-shared", "-fPIC", *map(str, SOURCES), "-o", str(built), "-lm"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, None, f"{compiler} could not run: {exc}"
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
            return None, None, next((line for line in lines if "error" in line), lines[0]).strip()[:300]
        try:  # loaded from the build folder: a stale library at the cache path may still be mapped under that name
            library, status = _load(built)
        except OSError as exc:  # e.g. libmvec missing at run time: the next flag set does without
            return None, None, f"the built library does not load: {exc}"
        try:
            _install(built, target)
        except OSError as exc:
            return library, dataclasses.replace(status, path=None, notice=(
                f"kernel cache {target.parent} is not writable ({exc.strerror or exc}); using kernels built in a "
                f"temporary folder, rebuilt every run (set QWEN3NEXT_CACHE to a writable folder)")), ""
        return library, dataclasses.replace(status, path=target), ""
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _install(built: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        shutil.copyfile(built, temporary)
        os.chmod(temporary, 0o755)
        os.replace(temporary, target)
    except OSError:
        os.unlink(temporary)
        raise


def _load(path: Path) -> tuple[ctypes.CDLL, KernelStatus]:
    """Load and declare a library; OSError if it is not one or lacks a symbol (a stale or damaged file).

    Raises KernelMismatch if a struct's size differs between C and its ctypes mirror."""
    library = ctypes.CDLL(str(path))
    try:
        _declare(library)
        sizes = {name: getattr(library, f"q3n_sizeof_{name}")() for name in MIRRORS}
    except AttributeError as exc:
        raise OSError(f"{path}: {exc}") from exc
    for name, mirror in MIRRORS.items():
        if sizes[name] != ctypes.sizeof(mirror):
            raise KernelMismatch(f"{path}: struct {name} is {sizes[name]} bytes in C but {ctypes.sizeof(mirror)} in "
                                 f"cpu_kernels.{mirror.__name__}; the ctypes mirror is out of date with csrc/")
    return library, KernelStatus(isa=library.q3n_isa().decode(), threaded=bool(library.q3n_openmp()), path=path)


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.q3n_linear_bf16.argtypes = [p, p, p, i64, i64, i64, c_int, c_int]
    lib.q3n_linear_bf16.restype = None
    lib.q3n_swiglu_experts_bf16.argtypes = [p, p, p, i64, p, p, i64, i64, c_int]
    lib.q3n_swiglu_experts_bf16.restype = None
    for kind, struct in (("bf16", MoeWeights), ("quant", MoeQuant)):
        weights = ctypes.POINTER(struct)
        getattr(lib, f"q3n_moe_block_{kind}").argtypes = [p, p, weights, i64, i64, p, p, p, c_int]
        getattr(lib, f"q3n_moe_route_{kind}").argtypes = [p, weights, i64, p, p, p, p, c_int]
        getattr(lib, f"q3n_moe_experts_{kind}").argtypes = [p, p, weights, i64, p, p, ctypes.c_float, c_int]
        for name in ("block", "route", "experts"):
            getattr(lib, f"q3n_moe_{name}_{kind}").restype = None
    lib.q3n_linear_q8.argtypes = [p, p, p, p, i64, i64, i64, c_int, c_int]
    lib.q3n_linear_q8.restype = None
    lib.q3n_linear_q4.argtypes = [p, p, p, i64, p, p, i64, i64, i64, c_int, c_int]
    lib.q3n_linear_q4.restype = None
    lib.q3n_embed_quant.argtypes = [i64, p, p, p, i64, i64, i64, p, i64, p]
    lib.q3n_embed_quant.restype = i64
    lib.q3n_experts_quant.argtypes = [p, ctypes.POINTER(ExpertLayout), p, p, i64, i64, p, p, c_int]
    lib.q3n_experts_quant.restype = None
    lib.q3n_experts_pairs.argtypes = [p, ctypes.POINTER(ExpertLayout), p, p, i64, p, i64, p, c_int]
    lib.q3n_experts_pairs.restype = None
    lib.q3n_experts_combine.argtypes = [p, p, i64, i64, i64, p, c_int]
    lib.q3n_experts_combine.restype = None
    lib.q3n_rms_norm_bf16.argtypes = [p, p, p, i64, i64, ctypes.c_float, ctypes.c_float]
    lib.q3n_rms_norm_bf16.restype = None
    lib.q3n_attend_one_bf16.argtypes = [p, p, p, p, i64, i64, i64, i64, i64, ctypes.c_float, c_int]
    lib.q3n_attend_one_bf16.restype = None
    lib.q3n_gated_delta_bf16.argtypes = [p] * 11 + [i64] * 6 + [ctypes.c_float, c_int]
    lib.q3n_gated_delta_bf16.restype = None
    lib.q3n_deltanet_layer_bf16.argtypes = [ctypes.POINTER(DeltaNetLayer), p, p, p, i64, p, p, p, p, c_int]
    lib.q3n_deltanet_layer_bf16.restype = None
    lib.q3n_attention_layer_bf16.argtypes = [ctypes.POINTER(AttentionLayer), p, p, p, i64, p, p, p, p, i64, i64, c_int]
    lib.q3n_attention_layer_bf16.restype = None
    lib.q3n_decode_layers.argtypes = [ctypes.POINTER(StepLayer), i64, p, i64, p, p, c_int]
    lib.q3n_decode_layers.restype = None
    lib.q3n_integer_tiles.restype = c_int
    lib.q3n_isa.restype = ctypes.c_char_p
    lib.q3n_openmp.restype = c_int
    for name in ("q3n_max_rows", "q3n_max_conv_kernel", *(f"q3n_sizeof_{name}" for name in MIRRORS)):
        getattr(lib, name).restype = i64


_lib: ctypes.CDLL | None = None
_loaded = False
_status = KernelStatus(reason="not prepared")
_said: set[str] = set()


def _say(text: str) -> None:
    """A notice on stderr, once per process."""
    if text and text not in _said:
        _said.add(text)
        print(f"qwen3next: {text}", file=sys.stderr)


def prepare(quiet: bool = False) -> KernelStatus:
    """Load the kernels (building them on first use on this machine), once per process; returns what runs.

    Unless quiet, says on stderr (once) that a build is starting, or why the torch fallback runs.
    Raises KernelMismatch if the library and this module disagree on a struct's layout.
    """
    global _lib, _loaded, _status, MAX_ROWS, MAX_CONV_KERNEL
    if not _loaded:
        _lib, _status = _open(quiet)
        _loaded = True
        # csrc/common.h's limits; 0 without a library, where no call is kernel-sized
        MAX_ROWS = _lib.q3n_max_rows() if _lib is not None else 0
        MAX_CONV_KERNEL = _lib.q3n_max_conv_kernel() if _lib is not None else 0
    if not quiet:
        _say(_status.notice)
    return _status


def __getattr__(name: str):
    """MAX_ROWS and MAX_CONV_KERNEL before the first `prepare()`: prepared on first use, like `library()`."""
    if name in ("MAX_ROWS", "MAX_CONV_KERNEL"):
        prepare()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (no compiler, build failed, or QWEN3NEXT_NO_KERNELS=1)."""
    if not _loaded:
        prepare()
    return _lib


def usable(x: torch.Tensor) -> bool:
    """True where the kernels apply: bf16 on the CPU, no autograd, and a built library.

    Callers add their own size limits: the kernels are for decode, a token or a few at a time.
    """
    return (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and library() is not None
    )


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, fp32_out: bool = False) -> torch.Tensor:
    """x [..., in] @ weight[out, in].T for a few rows of x (see `usable`); bf16, or the fp32 sums with fp32_out."""
    x = x.contiguous()
    out_features, in_features = weight.shape
    y = x.new_empty(*x.shape[:-1], out_features, dtype=torch.float32 if fp32_out else x.dtype)
    _lib.q3n_linear_bf16(weight.data_ptr(), x.data_ptr(), y.data_ptr(), x.numel() // in_features, out_features,
                         in_features, fp32_out, torch.get_num_threads())
    return y


def integer_tiles() -> bool:
    """Whether the quantized kernels have their integer tiles here (AVX-512 VNNI): then any number of rows runs
    faster through them than through a GEMM on the dequantized matrix; elsewhere only a few rows do."""
    return library() is not None and bool(_lib.q3n_integer_tiles())


def linear_q8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, fp32_out: bool = False) -> torch.Tensor:
    """x [..., in] (bf16, any number of rows) times int8 weights q [out, in] with fp32 row scales (quant/int8.py).

    Each row's result is the same bits whatever the other rows in the call (csrc/quant_kernels.c)."""
    x = x.contiguous()
    out_features, in_features = q.shape
    y = x.new_empty(*x.shape[:-1], out_features, dtype=torch.float32 if fp32_out else x.dtype)
    _lib.q3n_linear_q8(q.data_ptr(), scale.data_ptr(), x.data_ptr(), y.data_ptr(), x.numel() // in_features,
                       out_features, in_features, fp32_out, torch.get_num_threads())
    return y


def linear_q4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
              fp32_out: bool = False) -> torch.Tensor:
    """x [..., in] (bf16, any number of rows) times 4-bit group-quantized weights (quant/int4.py), as linear_q8."""
    x = x.contiguous()
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    y = x.new_empty(*x.shape[:-1], out_features, dtype=torch.float32 if fp32_out else x.dtype)
    _lib.q3n_linear_q4(packed.data_ptr(), scale.data_ptr(), minimum.data_ptr(), in_features // scale.shape[1],
                       x.data_ptr(), y.data_ptr(), x.numel() // in_features, out_features, in_features, fp32_out,
                       torch.get_num_threads())
    return y


def embed_quant(bits: int, arrays: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (int64, any shape) of a quantized table stored as `arrays` (codes, scale[, minimum]), dequantized
    to bf16 [*ids.shape, cols] with the bits of quant's dequantize; an out-of-range id is an IndexError."""
    codes, scale = arrays[0], arrays[1]
    rows, cols = codes.shape[0], codes.shape[1] * (2 if bits == 4 else 1)
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(*ids.shape, cols, dtype=torch.bfloat16)
    minimum, group = (arrays[2].data_ptr(), cols // scale.shape[1]) if bits == 4 else (None, 0)
    bad = _lib.q3n_embed_quant(bits, codes.data_ptr(), scale.data_ptr(), minimum, group, rows, cols, flat.data_ptr(),
                               flat.numel(), out.data_ptr())
    if bad >= 0:
        raise IndexError(f"token id {int(flat[bad])} is out of range for an embedding of {rows} rows")
    return out


def swiglu_experts_bf16(
    x: torch.Tensor, table: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, intermediate: int
) -> torch.Tensor:
    """One token x [hidden] (or [1, hidden]) through experts `ids` [k] (int64), summed with `weights` [k] (fp32).

    `table` [experts, 3] int64 holds each expert's gate, up and down weight addresses; the caller
    owns those tensors and keeps them alive.
    """
    x = x.contiguous()
    out = torch.empty_like(x)
    _lib.q3n_swiglu_experts_bf16(table.data_ptr(), ids.data_ptr(), weights.data_ptr(), ids.numel(), x.data_ptr(),
                                 out.data_ptr(), x.shape[-1], intermediate, torch.get_num_threads())
    return out


class MoeWeights(ctypes.Structure):
    """csrc's q3n_moe_weights: addresses of a sparse MoE block's bf16 weights and its sizes."""

    _fields_ = [("router", ctypes.c_void_p), ("experts", ctypes.c_int64), ("top_k", ctypes.c_int64),
                ("norm_topk", ctypes.c_int64), ("table", ctypes.c_void_p), ("inter", ctypes.c_int64),
                ("shared_gate", ctypes.c_void_p), ("shared_up", ctypes.c_void_p), ("shared_down", ctypes.c_void_p),
                ("shared_inter", ctypes.c_int64), ("shared_expert_gate", ctypes.c_void_p)]


def _routing_buffers(weights: MoeWeights, tokens: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.empty(tokens, weights.top_k, dtype=torch.int64), torch.empty(tokens, weights.top_k),
            torch.empty(tokens, weights.experts))


def _moe_kind(weights: "MoeWeights | MoeQuant") -> str:
    """Which kernel family reads `weights`: bf16 routed experts (decode_kernels.c) or quantized blobs
    (layer_kernels.c); both take the same arguments."""
    return "quant" if isinstance(weights, MoeQuant) else "bf16"


def moe_block(x: torch.Tensor, weights: "MoeWeights | MoeQuant"):
    """A sparse MoE block for tokens x [T, hidden] (T <= MAX_ROWS), each token with the bits it gets alone, every
    expert resident. Returns (output [T, hidden], ids [T, k] int64, routing weights [T, k] fp32, router logits
    [T, experts] fp32)."""
    x = x.contiguous()
    tokens = x.numel() // x.shape[-1]
    if tokens > MAX_ROWS:
        raise ValueError(f"moe_block: {tokens} tokens, more than the kernel's {MAX_ROWS}")
    out = torch.empty_like(x)
    ids, routing, logits = _routing_buffers(weights, tokens)
    getattr(_lib, f"q3n_moe_block_{_moe_kind(weights)}")(
        x.data_ptr(), out.data_ptr(), ctypes.byref(weights), x.shape[-1], tokens, ids.data_ptr(), routing.data_ptr(),
        logits.data_ptr(), torch.get_num_threads())
    return out, ids, routing, logits


def moe_route(x: torch.Tensor, weights: "MoeWeights | MoeQuant"):
    """moe_block's first half for one token: (ids [1, k] int64, routing weights [1, k] fp32, router logits
    [1, experts] fp32, the shared expert's gate logit). Then make the chosen experts' table entries valid and
    call moe_experts: the two give the block's bits."""
    x = x.contiguous()
    ids, routing, logits = _routing_buffers(weights)
    gate_logit = ctypes.c_float()
    getattr(_lib, f"q3n_moe_route_{_moe_kind(weights)}")(
        x.data_ptr(), ctypes.byref(weights), x.shape[-1], ids.data_ptr(), routing.data_ptr(), logits.data_ptr(),
        ctypes.byref(gate_logit), torch.get_num_threads())
    return ids, routing, logits, gate_logit.value


def moe_experts(x: torch.Tensor, weights: "MoeWeights | MoeQuant", ids: torch.Tensor, routing: torch.Tensor,
                gate_logit: float) -> torch.Tensor:
    """moe_block's second half: the block output [1, hidden] for the experts moe_route chose."""
    x = x.contiguous()
    out = torch.empty_like(x)
    getattr(_lib, f"q3n_moe_experts_{_moe_kind(weights)}")(
        x.data_ptr(), out.data_ptr(), ctypes.byref(weights), x.shape[-1], ids.data_ptr(), routing.data_ptr(),
        gate_logit, torch.get_num_threads())
    return out


class Projection(ctypes.Structure):
    """csrc's q3n_projection: one projection's format and its arrays' byte offsets from the address in column
    `piece` of its expert's row of the address table."""

    _fields_ = [(name, ctypes.c_int64)
                for name in ("bits", "rows", "cols", "group", "codes", "scale", "minimum", "piece")]


class ExpertLayout(ctypes.Structure):
    """csrc's q3n_expert_layout: where gate, up and down live for every expert of a layer, from a table of `pieces`
    addresses per expert (quantized blobs: one; bf16 experts: three)."""

    _fields_ = [("gate", Projection), ("up", Projection), ("down", Projection), ("pieces", ctypes.c_int64)]


def bf16_layout(inter: int, hidden: int) -> ExpertLayout:
    """The layout of bf16 experts addressed by the [experts, 3] table of gate, up and down matrices (the fused MoE
    kernel's table), so that experts_quant and experts_pairs run them."""
    gate, up = (Projection(16, inter, hidden, 0, 0, 0, 0, piece) for piece in (0, 1))
    return ExpertLayout(gate, up, Projection(16, hidden, inter, 0, 0, 0, 0, 2), 3)


def experts_quant(x: torch.Tensor, table: torch.Tensor, layout: ExpertLayout, ids: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """Rows x [N, hidden] (bf16; or one token [hidden]) through experts ids [N, k] (int64), summed with weights
    [N, k] (fp32) in the router's order: experts_pairs then experts_combine, in one call.

    `table` [experts, layout.pieces] int64 holds each expert's addresses: a quantized blob's (quant/layout.py), or
    a bf16 expert's three matrices (bf16_layout); the caller keeps them alive.
    """
    x = x.contiguous()
    out = torch.empty_like(x)
    rows = x.numel() // layout.gate.cols
    _lib.q3n_experts_quant(table.data_ptr(), ctypes.byref(layout), ids.data_ptr(), weights.data_ptr(), rows,
                           ids.numel() // rows, x.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out


def experts_pairs(x: torch.Tensor, table: torch.Tensor, layout: ExpertLayout, ids: torch.Tensor,
                  tokens: torch.Tensor) -> torch.Tensor:
    """[P, hidden] fp32: row tokens[p] of x [N, hidden] (bf16) through expert ids[p] of `table` (as experts_quant
    takes it), unweighted (ids and tokens [P] int64); each expert runs once on all its rows."""
    x = x.contiguous()
    out = torch.empty(ids.numel(), layout.gate.cols)
    _lib.q3n_experts_pairs(table.data_ptr(), ctypes.byref(layout), ids.data_ptr(), tokens.data_ptr(), ids.numel(),
                           x.data_ptr(), x.numel() // layout.gate.cols, out.data_ptr(), torch.get_num_threads())
    return out


def experts_combine(pairs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[N, hidden] bf16: sum_i weights[n, i] * pairs[n * k + i] in the router's order i (weights [N, k] fp32,
    pairs [N * k, hidden] fp32 as experts_pairs returns them): experts_quant's bits."""
    rows, top_k = weights.shape
    out = torch.empty(rows, pairs.shape[-1], dtype=torch.bfloat16)
    _lib.q3n_experts_combine(pairs.contiguous().data_ptr(), weights.contiguous().data_ptr(), rows, top_k,
                             pairs.shape[-1], out.data_ptr(), torch.get_num_threads())
    return out


def rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """RMSNorm over the last dim scaled by (offset + weight); offset 1 for zero-centered norms."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dim = x.shape[-1]
    _lib.q3n_rms_norm_bf16(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // dim, dim, eps, offset)
    return out


def attend_one_bf16(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """query [1, heads, 1, dim] against keys/values [1, kv_heads, length, dim] (rows contiguous, heads strided)."""
    _, heads, _, dim = query.shape
    _, kv_heads, length, _ = keys.shape
    if keys.stride() != values.stride() or keys.stride(2) != dim or keys.stride(3) != 1:
        raise ValueError("attend_one_bf16: keys and values must share a layout with contiguous rows")
    query = query.contiguous()
    out = torch.empty_like(query)
    _lib.q3n_attend_one_bf16(query.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(), kv_heads,
                             heads // kv_heads, length, dim, keys.stride(1), dim**-0.5, torch.get_num_threads())
    return out


def gated_delta_bf16(qkvz, ba, conv_weight, conv_state, A_log, dt_bias, norm_weight, state, out,
                     k_heads: int, v_heads: int, k_dim: int, v_dim: int, eps: float,
                     kept: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Tokens [1, T, ...] through a Gated DeltaNet core (csrc/decode_kernels.c); updates the states in place.

    kept = (recurrent [T - 1, *state.shape[1:]], conv [T - 1, *conv_state.shape[1:]]) receives the states after
    each token but the last (a speculative verify pass rolls back to them)."""
    kept_state, kept_conv = (None, None) if kept is None else (kept[0].data_ptr(), kept[1].data_ptr())
    _lib.q3n_gated_delta_bf16(
        qkvz.data_ptr(), ba.data_ptr(), conv_weight.data_ptr(), conv_state.data_ptr(), A_log.data_ptr(),
        dt_bias.data_ptr(), norm_weight.data_ptr(), state.data_ptr(), out.data_ptr(), kept_state, kept_conv,
        qkvz.shape[1], k_heads, v_heads, k_dim, v_dim, conv_weight.shape[-1], eps, torch.get_num_threads(),
    )


class Matrix(ctypes.Structure):
    """csrc's q3n_matrix: one weight matrix of a layer kernel, bf16 (bits 16) or 8/4-bit (quant/int8.py, int4.py)."""

    _fields_ = [("bits", ctypes.c_int64), ("codes", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("minimum", ctypes.c_void_p), ("rows", ctypes.c_int64), ("cols", ctypes.c_int64),
                ("group", ctypes.c_int64)]


class LayerNorms(ctypes.Structure):
    """csrc's q3n_layer_norms: a decoder layer's zero-centered norms before and after its mixer."""

    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("hidden", ctypes.c_int64),
                ("eps", ctypes.c_float)]


class DeltaNetLayer(ctypes.Structure):
    """csrc's q3n_deltanet_layer: what q3n_deltanet_layer_bf16 reads of a Gated DeltaNet layer."""

    _fields_ = [("norms", LayerNorms), ("qkvz", Matrix), ("ba", Matrix), ("out", Matrix),
                *((name, ctypes.c_void_p) for name in ("conv_weight", "A_log", "dt_bias", "norm_weight")),
                *((name, ctypes.c_int64) for name in ("k_heads", "v_heads", "dk", "dv", "kernel"))]


class AttentionLayer(ctypes.Structure):
    """csrc's q3n_attention_layer: what q3n_attention_layer_bf16 reads of a gated attention layer."""

    _fields_ = [("norms", LayerNorms), ("q", Matrix), ("k", Matrix), ("v", Matrix), ("o", Matrix),
                ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p),
                *((name, ctypes.c_int64) for name in ("heads", "kv_heads", "head_dim", "rotary_dim")),
                ("scale", ctypes.c_float)]


class MoeQuant(ctypes.Structure):
    """csrc's q3n_moe_quant: a sparse MoE block whose routed experts are quantized blobs."""

    _fields_ = [("router", Matrix), ("experts", ctypes.c_int64), ("top_k", ctypes.c_int64),
                ("norm_topk", ctypes.c_int64), ("blobs", ctypes.c_void_p), ("layout", ctypes.POINTER(ExpertLayout)),
                ("shared_gate", Matrix), ("shared_up", Matrix), ("shared_down", Matrix),
                ("shared_expert_gate", Matrix)]


_rebinds = 0  # how many times any module got a parameter, buffer or submodule assigned (torch's global hooks)


def _count_rebind(*_) -> None:
    global _rebinds
    _rebinds += 1


for _register in (torch.nn.modules.module.register_module_parameter_registration_hook,
                  torch.nn.modules.module.register_module_buffer_registration_hook,
                  torch.nn.modules.module.register_module_module_registration_hook):
    _register(_count_rebind)


def rebind_count() -> int:
    """Changes whenever a module anywhere is given a new parameter, buffer or submodule (`m.weight =
    nn.Parameter(...)`, a module swapped in, `load_state_dict(assign=True)`): a structure built from a
    module's tensors before then may point at tensors the module no longer holds. Not called in the hot path:
    loading counts thousands, a decode step none."""
    return _rebinds


_fixed = threading.local()  # .epoch: set inside a WeightsFixed block on this thread
_epochs = itertools.count(1)


class WeightsFixed:
    """A generation's promise that no weight moves between its steps, so that each layer's kernel checks its
    tensors' addresses once per generation rather than on every step (~15 tensors a kernel, two kernels a
    layer: ~50 µs of a hidden-512 model's 2 ms step, docs/kernels.md). Enter it around each step, never across
    a yield: outside a block (and on other threads) every check runs as before. A rebind (rebind_count) is
    still seen at once; only `.data` swaps and in-place reallocations made while a generation is under way go
    unseen until its next one."""

    def __init__(self):
        self.epoch = next(_epochs)

    def __enter__(self) -> "WeightsFixed":
        self.outer, _fixed.epoch = getattr(_fixed, "epoch", None), self.epoch
        return self

    def __exit__(self, *_) -> None:
        _fixed.epoch = self.outer


class LayerKernel:
    """A layer's kernel struct with the tensors it points into, kept alive here; `valid()` says whether the
    struct still describes the module: no tensor was rebound anywhere since it was built (rebind_count) and
    none has moved (a `.data` swap or in-place reallocation; checked once per WeightsFixed block). `Module.to()`
    and friends drop the whole object (model.DecoderLayer._apply, moe.SparseMoE._apply)."""

    def __init__(self, struct: ctypes.Structure, tensors: list[torch.Tensor]):
        self.struct, self.pointer = struct, ctypes.byref(struct)
        self.tensors = tensors
        self.addresses = [t.data_ptr() for t in tensors]
        self.rebinds = _rebinds
        self.checked_in: int | None = None  # the WeightsFixed epoch in which the addresses were last checked

    def valid(self) -> bool:
        if self.rebinds != _rebinds:
            return False
        epoch = getattr(_fixed, "epoch", None)
        if epoch is not None and self.checked_in == epoch:
            return True
        if not all(t.data_ptr() == a for t, a in zip(self.tensors, self.addresses)):
            return False
        self.checked_in = epoch
        return True


def deltanet_layer_bf16(kernel: LayerKernel, x: torch.Tensor, conv_state: torch.Tensor, state: torch.Tensor,
                        kept: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens x [1, T, hidden] (T <= MAX_ROWS) through a decoder layer's norm, Gated DeltaNet mixer and residual
    add (csrc/layer_kernels.c); returns (the residual stream after the mixer, its post-attention norm). The
    states update in place; kept as gated_delta_bf16 takes it."""
    x = x.contiguous()
    out, normed = torch.empty_like(x), torch.empty_like(x)
    kept_state, kept_conv = (None, None) if kept is None else (kept[0].data_ptr(), kept[1].data_ptr())
    _lib.q3n_deltanet_layer_bf16(kernel.pointer, x.data_ptr(), out.data_ptr(), normed.data_ptr(), x.shape[1],
                                 conv_state.data_ptr(), state.data_ptr(), kept_state, kept_conv, torch.get_num_threads())
    return out, normed


def attention_layer_bf16(kernel: LayerKernel, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         keys: torch.Tensor, values: torch.Tensor, past: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens x [1, T, hidden] (T <= MAX_ROWS) at positions past.. through a decoder layer's norm, gated attention
    and residual add, each query over the positions up to its own; their keys and values are written into
    keys/values [1, kv_heads, capacity, head_dim] at past... cos, sin: [T, rotary_dim]. Returns as
    deltanet_layer_bf16."""
    x = x.contiguous()
    out, normed = torch.empty_like(x), torch.empty_like(x)
    _lib.q3n_attention_layer_bf16(kernel.pointer, x.data_ptr(), out.data_ptr(), normed.data_ptr(), x.shape[1],
                                  cos.data_ptr(), sin.data_ptr(), keys.data_ptr(), values.data_ptr(), past,
                                  keys.shape[2], torch.get_num_threads())
    return out, normed


class StepLayer(ctypes.Structure):
    """csrc's q3n_step_layer: one decoder layer of a whole-step call, its kernels and this step's state."""

    _fields_ = [("attention", ctypes.c_int64), ("mixer", ctypes.c_void_p), ("quantized_moe", ctypes.c_int64),
                ("moe", ctypes.c_void_p), ("conv_state", ctypes.c_void_p), ("state", ctypes.c_void_p),
                ("kept_state", ctypes.c_void_p), ("kept_conv", ctypes.c_void_p), ("keys", ctypes.c_void_p),
                ("values", ctypes.c_void_p), ("past", ctypes.c_int64), ("capacity", ctypes.c_int64),
                ("ids", ctypes.c_void_p), ("weights", ctypes.c_void_p), ("logits", ctypes.c_void_p)]


def decode_layers(layers: ctypes.Array, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """x [1, T, hidden] (contiguous, T <= MAX_ROWS) through every layer of `layers` (StepLayer entries, filled in
    for this step) in place: csrc/layer_kernels.c's q3n_decode_layers."""
    if x.shape[1] > MAX_ROWS:  # the C side's per-token buffers hold MAX_ROWS
        raise ValueError(f"decode_layers: {x.shape[1]} tokens, more than the kernel's {MAX_ROWS}")
    _lib.q3n_decode_layers(layers, len(layers), x.data_ptr(), x.shape[1], cos.data_ptr(), sin.data_ptr(),
                           torch.get_num_threads())


# The structs the ctypes layer mirrors, by their C names: each is checked against q3n_sizeof_<name> at load.
MIRRORS: dict[str, type[ctypes.Structure]] = {
    "q3n_moe_weights": MoeWeights, "q3n_projection": Projection, "q3n_expert_layout": ExpertLayout,
    "q3n_matrix": Matrix, "q3n_layer_norms": LayerNorms, "q3n_deltanet_layer": DeltaNetLayer,
    "q3n_attention_layer": AttentionLayer, "q3n_moe_quant": MoeQuant, "q3n_step_layer": StepLayer,
}
