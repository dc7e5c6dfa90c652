"""Bandwidth-bound decode kernels (csrc/*.c), built at first use, with a torch fallback.

Why our own: at decode every linear layer is a matrix-vector product, bound by reading the
weights. torch's bf16 path on CPU reaches about a third of the read bandwidth there; a plain C
loop compiled for the host reaches most of it (figures in docs/performance.md). The source is
compiled once per machine with the system C compiler into a cache folder and loaded with
ctypes. Without a compiler, or with QWEN3NEXT_NO_KERNELS=1, everything runs through torch:
same results to bf16 rounding, just slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "decode_kernels.c", CSRC / "quant_kernels.c")  # both include csrc/common.h
MAX_ROWS = 8  # activation rows up to which the matrix-vector kernel beats a GEMM
MAX_CONV_KERNEL = 8  # csrc's Q3N_MAX_CONV_KERNEL
# Tried in order: vector expf from glibc's libmvec, then without it, then without OpenMP or -march.
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-DQ3N_LIBMVEC", "-lmvec"],
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3"],
)


def _cache_dir() -> Path:
    root = os.environ.get("QWEN3NEXT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qwen3next")
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and its CPU flags."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _build() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        log.info("no C compiler found; decode kernels fall back to torch")
        return None
    source = b"".join(path.read_bytes() for path in (*SOURCES, CSRC / "common.h"))
    for flags in _FLAG_SETS:
        key = hashlib.sha256(source + " ".join(flags).encode() + _cpu_signature().encode()).hexdigest()[:16]
        library = _cache_dir() / f"decode_kernels-{key}.so"
        if not library.exists() and not _compile(compiler, flags, library):
            continue
        try:
            return ctypes.CDLL(str(library))
        except OSError as exc:
            log.info("could not load %s: %s", library, exc)
    return None


def _compile(compiler: str, flags: list[str], library: Path) -> bool:
    """Compile into a temporary file and rename it into place, so a half-written library is never loaded."""
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(suffix=".so", dir=library.parent)
        os.close(fd)
    except OSError as exc:
        log.info("cannot write the kernel cache %s: %s", library.parent, exc)
        return False
    command = [compiler, *flags, "-shared", "-fPIC", *map(str, SOURCES), "-o", temporary, "-lm"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        os.unlink(temporary)
        log.info("kernel build could not run: %s", exc)
        return False
    if done.returncode != 0:
        os.unlink(temporary)
        log.info("kernel build failed with %s: %s", " ".join(flags), done.stderr.strip()[:500])
        return False
    os.replace(temporary, library)
    return True


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.q3n_linear_bf16.argtypes = [p, p, p, i64, i64, i64, c_int]
    lib.q3n_linear_bf16.restype = None
    lib.q3n_swiglu_experts_bf16.argtypes = [p, p, p, i64, p, p, i64, i64, c_int]
    lib.q3n_swiglu_experts_bf16.restype = None
    lib.q3n_moe_block_bf16.argtypes = [p, p, ctypes.POINTER(MoeWeights), i64, p, p, p, c_int]
    lib.q3n_moe_block_bf16.restype = None
    lib.q3n_linear_q8.argtypes = [p, p, p, p, i64, i64, i64, c_int]
    lib.q3n_linear_q8.restype = None
    lib.q3n_linear_q4.argtypes = [p, p, p, i64, p, p, i64, i64, i64, c_int]
    lib.q3n_linear_q4.restype = None
    lib.q3n_experts_quant.argtypes = [p, ctypes.POINTER(ExpertLayout), p, p, i64, p, p, c_int]
    lib.q3n_experts_quant.restype = None
    lib.q3n_rms_norm_bf16.argtypes = [p, p, p, i64, i64, ctypes.c_float, ctypes.c_float]
    lib.q3n_rms_norm_bf16.restype = None
    lib.q3n_attend_one_bf16.argtypes = [p, p, p, p, i64, i64, i64, i64, i64, ctypes.c_float, c_int]
    lib.q3n_attend_one_bf16.restype = None
    lib.q3n_gated_delta_bf16.argtypes = [p] * 9 + [i64] * 6 + [ctypes.c_float, c_int]
    lib.q3n_gated_delta_bf16.restype = None
    return lib


_lib: ctypes.CDLL | None = None
_loaded = False


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (no compiler, build failed, or QWEN3NEXT_NO_KERNELS=1)."""
    global _lib, _loaded
    if not _loaded:
        _loaded = True
        if os.environ.get("QWEN3NEXT_NO_KERNELS", "") not in ("", "0"):
            _lib = None
        else:
            built = _build()
            _lib = _declare(built) if built is not None else None
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


def linear_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight[out, in].T for a few rows of x (see `usable`)."""
    x = x.contiguous()
    out_features, in_features = weight.shape
    y = x.new_empty(*x.shape[:-1], out_features)
    rows = x.numel() // in_features
    _lib.q3n_linear_bf16(weight.data_ptr(), x.data_ptr(), y.data_ptr(), rows, out_features, in_features,
                         torch.get_num_threads())
    return y


def linear_q8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., in] (bf16, a few rows) times int8 weights q [out, in] with fp32 row scales (quant/int8.py)."""
    x = x.contiguous()
    out_features, in_features = q.shape
    y = x.new_empty(*x.shape[:-1], out_features)
    _lib.q3n_linear_q8(q.data_ptr(), scale.data_ptr(), x.data_ptr(), y.data_ptr(), x.numel() // in_features,
                       out_features, in_features, torch.get_num_threads())
    return y


def linear_q4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """x [..., in] (bf16, a few rows) times 4-bit group-quantized weights (quant/int4.py)."""
    x = x.contiguous()
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    y = x.new_empty(*x.shape[:-1], out_features)
    _lib.q3n_linear_q4(packed.data_ptr(), scale.data_ptr(), minimum.data_ptr(), in_features // scale.shape[1],
                       x.data_ptr(), y.data_ptr(), x.numel() // in_features, out_features, in_features,
                       torch.get_num_threads())
    return y


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


def _routing_buffers(weights: MoeWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.empty(1, weights.top_k, dtype=torch.int64), torch.empty(1, weights.top_k),
            torch.empty(1, weights.experts))


def moe_block_bf16(x: torch.Tensor, weights: MoeWeights):
    """A sparse MoE block for one token x [1, hidden]. Returns (output [1, hidden], ids [1, k] int64,
    routing weights [1, k] fp32, router logits [1, experts] fp32)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    ids, routing, logits = _routing_buffers(weights)
    _lib.q3n_moe_block_bf16(x.data_ptr(), out.data_ptr(), ctypes.byref(weights), x.shape[-1], ids.data_ptr(),
                            routing.data_ptr(), logits.data_ptr(), torch.get_num_threads())
    return out, ids, routing, logits




class Projection(ctypes.Structure):
    """csrc's q3n_projection: one projection's format and its arrays' byte offsets inside an expert blob."""

    _fields_ = [(name, ctypes.c_int64) for name in ("bits", "rows", "cols", "group", "codes", "scale", "minimum")]


class ExpertLayout(ctypes.Structure):
    """csrc's q3n_expert_layout: where gate, up and down live in every expert blob of a layer."""

    _fields_ = [("gate", Projection), ("up", Projection), ("down", Projection)]


def experts_quant(x: torch.Tensor, blobs: torch.Tensor, layout: ExpertLayout, ids: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """One token x [hidden] (bf16) through quantized experts `ids` [k] (int64) summed with `weights` [k] (fp32).

    `blobs` [experts] int64 holds each expert blob's address (quant/layout.py); the caller keeps them alive.
    """
    x = x.contiguous()
    out = torch.empty_like(x)
    _lib.q3n_experts_quant(blobs.data_ptr(), ctypes.byref(layout), ids.data_ptr(), weights.data_ptr(), ids.numel(),
                           x.data_ptr(), out.data_ptr(), torch.get_num_threads())
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
                     k_heads: int, v_heads: int, k_dim: int, v_dim: int, eps: float) -> None:
    """Tokens [1, T, ...] through a Gated DeltaNet core (csrc/decode_kernels.c); updates the states in place."""
    _lib.q3n_gated_delta_bf16(
        qkvz.data_ptr(), ba.data_ptr(), conv_weight.data_ptr(), conv_state.data_ptr(), A_log.data_ptr(),
        dt_bias.data_ptr(), norm_weight.data_ptr(), state.data_ptr(), out.data_ptr(), qkvz.shape[1], k_heads,
        v_heads, k_dim, v_dim, conv_weight.shape[-1], eps, torch.get_num_threads(),
    )
