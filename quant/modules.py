"""Weight-only quantized stand-ins for the model's Linear and Embedding modules (gpt-fast style swap-in).

The loader replaces a module whose matrix the checkpoint stores quantized; the model code does not
change. bf16 calls on the CPU run the 8/4-bit kernels on the stored codes (any number of rows where the
kernels have their integer tiles); everything else (other devices or dtypes, no C compiler) dequantizes
the matrix for the call and uses a dense matmul.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen3next import cpu_kernels
from qwen3next.layers import linear

from . import int4, int8


def dequantize(bits: int, arrays: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] matrix stored as `arrays` (codes, scale[, minimum]) at `bits`."""
    return int8.dequantize(*arrays, dtype=dtype) if bits == 8 else int4.dequantize(*arrays, dtype=dtype)


KERNEL_ROWS = 128  # rows up to which the kernels' row loops (no integer tiles) beat dequantizing the matrix


def quantized_matmul(x: torch.Tensor, bits: int, arrays: list[torch.Tensor], fp32_out: bool = False) -> torch.Tensor:
    """x [..., in] @ W.T for a matrix stored as `arrays` (fp32 sums kept with fp32_out, for logits).

    bf16 rows on the CPU take the 8/4-bit kernels in one call: any number of rows where the kernels have
    integer dot products (AVX-512 VNNI, AVX2), up to KERNEL_ROWS elsewhere (their fp32 row loops lose to a GEMM
    beyond). Each row's result is then the same bits alone or among the others (a speculative verify pass
    needs that, and with the tiles a prompt's logits do not depend on the chunk size), and nothing the size
    of the matrix is allocated. The tiles beat dequantizing for a bf16 GEMM wherever the model meets them
    but on small matrices at hundreds of rows (docs/kernels.md). Other devices, more rows without the
    tiles, or no C compiler: a dense matmul on the dequantized matrix."""
    few = x.numel() // x.shape[-1] <= KERNEL_ROWS
    if arrays[0].device.type == "cpu" and cpu_kernels.usable(x) and (few or cpu_kernels.integer_tiles()):
        kernel = cpu_kernels.linear_q8 if bits == 8 else cpu_kernels.linear_q4
        return kernel(x, *arrays, fp32_out=fp32_out)
    return linear(x, dequantize(bits, arrays, x.dtype), fp32_out)


class QuantizedLinear(nn.Module):
    """y = x @ W.T with W [out, in] stored as int8 rows (codes, scale) or int4 groups (codes, scale, minimum)."""

    def __init__(self, bits: int, arrays: list[torch.Tensor]):
        super().__init__()
        if bits not in (4, 8) or len(arrays) != (2 if bits == 8 else 3):
            raise ValueError(f"a {bits}-bit matrix is not stored as {len(arrays)} arrays")
        self.bits = bits
        self.register_buffer("codes", arrays[0])
        self.register_buffer("scale", arrays[1])
        self.register_buffer("minimum", arrays[2] if bits == 4 else None)
        self.out_features = arrays[0].shape[0]
        self.in_features = arrays[0].shape[1] * (2 if bits == 4 else 1)

    @property
    def arrays(self) -> list[torch.Tensor]:
        """The stored arrays in the format's order: codes, scale[, minimum]."""
        return [self.codes, self.scale] if self.bits == 8 else [self.codes, self.scale, self.minimum]

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.bits, self.arrays, dtype)

    def forward(self, x: torch.Tensor, fp32_out: bool = False) -> torch.Tensor:
        return quantized_matmul(x, self.bits, self.arrays, fp32_out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


class QuantizedEmbedding(QuantizedLinear):
    """An embedding table stored like a quantized matrix: rows are looked up and dequantized per call.

    `project` uses the same table as an output projection, for models with tied embeddings.
    """

    def __init__(self, bits: int, arrays: list[torch.Tensor], dtype: torch.dtype):
        super().__init__(bits, arrays)
        self.dtype = dtype  # what a lookup returns: the model's activation dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.bfloat16 and self.codes.device.type == "cpu" and ids.device.type == "cpu" \
                and cpu_kernels.library() is not None:
            return cpu_kernels.embed_quant(self.bits, self.arrays, ids)  # the same bits, one call
        flat = ids.reshape(-1)
        rows = dequantize(self.bits, [array[flat] for array in self.arrays], self.dtype)
        return rows.view(*ids.shape, self.in_features)

    def project(self, hidden: torch.Tensor, fp32_out: bool = False) -> torch.Tensor:
        return super().forward(hidden, fp32_out)
