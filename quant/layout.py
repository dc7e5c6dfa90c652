"""How quantized tensors are named and laid out on disk (format version 1, specified in docs/format.md).

A quantized matrix `X.weight` [out, in] is stored as tensors beside each other (the names come from
qwen3next.checkpoint_names, which owns every tensor name):
  8 bits: `X.weight.q8` I8 [out, in] and `X.weight.scale` F32 [out]
  4 bits: `X.weight.q4` U8 [out, in/2], `X.weight.scale` F16 [out, in/group], `X.weight.min` F16 [out, in/group]
Every routed expert of every layer is one U8 tensor `P.mlp.experts.E.packed` holding its gate, up and down
projections back to back, each as the arrays above, every array starting at a multiple of ALIGN bytes of
the blob. An offloading store fetches an expert with one read and moves it to a GPU with one copy.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen3next.checkpoint_names import PROJECTIONS, projection_shapes

from . import int4

FORMAT_VERSION = 1
ALIGN = 64  # bytes: a cache line, and a multiple of every element size in the format


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def array_specs(rows: int, cols: int, bits: int, group: int) -> list[tuple[str, tuple[int, ...], int]]:
    """(safetensors dtype, shape, bytes) of each stored array of a [rows, cols] matrix at `bits`."""
    if bits == 8:
        return [("I8", (rows, cols), rows * cols), ("F32", (rows,), 4 * rows)]
    if bits == 4:
        groups = cols // group
        return [("U8", (rows, cols // 2), rows * cols // 2), ("F16", (rows, groups), 2 * rows * groups),
                ("F16", (rows, groups), 2 * rows * groups)]
    raise ValueError(f"bits must be 4 or 8, not {bits}")


@dataclass(frozen=True)
class ProjectionLayout:
    """One projection inside an expert blob: its format and where each of its arrays starts."""

    bits: int
    rows: int
    cols: int
    group: int  # input weights per scale (4 bits); equal to cols for 8 bits
    offsets: tuple[int, ...]  # byte offsets in the blob: codes, scale[, minimum]

    def spec(self) -> dict:
        return {"bits": self.bits, "group": self.group}


@dataclass(frozen=True)
class ExpertLayout:
    """The byte layout of every expert blob of one layer."""

    projections: dict[str, ProjectionLayout]
    nbytes: int  # blob size, a multiple of ALIGN

    @classmethod
    def build(cls, hidden: int, intermediate: int, formats: dict[str, dict]) -> "ExpertLayout":
        """formats: projection -> {"bits": 4|8, "group": G} (G is ignored for 8 bits)."""
        shapes = projection_shapes(hidden, intermediate)
        projections, cursor = {}, 0
        for name in PROJECTIONS:
            rows, cols = shapes[name]
            bits = formats[name]["bits"]
            group = int4.group_for(cols, formats[name]["group"]) if bits == 4 else cols
            offsets = []
            for _, _, size in array_specs(rows, cols, bits, group):
                offsets.append(cursor)
                cursor = aligned(cursor + size)
            projections[name] = ProjectionLayout(bits, rows, cols, group, tuple(offsets))
        return cls(projections, cursor)

    def spec(self) -> dict:
        """What config.json records for the layer (enough, with hidden and intermediate, to rebuild this)."""
        return {name: p.spec() for name, p in self.projections.items()}
