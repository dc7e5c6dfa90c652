"""Reading a quantized folder's description: the format check, expert layouts and the expected tensors.

The loader asks this module what a quantized checkpoint must hold (so missing, stray and mis-shaped
tensors are all reported in one error, as for bf16 folders) and which matrices are stored at how
many bits; config.json's `quantization` section says how every layer's expert blobs are laid out.
"""

from __future__ import annotations

from qwen3next.checkpoint_names import dense_shapes, packed_expert_name, quantized_names
from qwen3next.config import Qwen3NextConfig
from qwen3next.errors import ConfigError
from qwen3next.model import Qwen3NextForCausalLM
from qwen3next.weights import CheckpointReader

from .layout import FORMAT_VERSION, ExpertLayout, array_specs


def expert_layouts(config: Qwen3NextConfig, prefixes: list[str]) -> dict[str, ExpertLayout]:
    """Each MoE layer's blob layout, from config.json's quantization section (checked to be one we read)."""
    section = config.quantization or {}
    if section.get("format") != "qwen3next":
        raise ConfigError(f"config.json: quantization format {section.get('format')!r} is not supported "
                          "(this folder was not made by `qwen3next quantize`)")
    version = section.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ConfigError(f"config.json: quantization format_version {version!r} is newer than this qwen3next "
                          f"reads ({FORMAT_VERSION}); upgrade qwen3next")
    experts = section.get("experts") or {}
    layouts = {}
    for prefix in prefixes:
        try:
            layouts[prefix] = ExpertLayout.build(config.hidden_size, config.moe_intermediate_size, experts[prefix])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"config.json: quantization.experts has no valid layout for {prefix} ({exc})") from None
    return layouts


def stored_bits(names: CheckpointReader, name: str) -> int | None:
    """8 or 4 when matrix `name` is stored quantized (its codes tensor is present), else None."""
    for bits in (8, 4):
        if quantized_names(name, bits)[0] in names:
            return bits
    return None


def expected_shapes(model: Qwen3NextForCausalLM, reader: CheckpointReader,
                    layouts: dict[str, ExpertLayout]) -> dict[str, tuple[int, ...]]:
    """What a quantized checkpoint of `model` (built on the meta device) must hold.

    Matrices whose codes tensor is present are expected in that format (the 4-bit group size read
    from the stored scale's shape); every routed expert is one blob, laid out as `layouts` says.
    """
    shapes = {}
    for name, shape in dense_shapes(model).items():
        bits = stored_bits(reader, name) if len(shape) == 2 else None
        if bits is None:
            shapes[name] = shape
            continue
        rows, cols = shape
        group = cols
        if bits == 4:
            scale = quantized_names(name, 4)[1]
            groups = reader.shape(scale)[-1] if scale in reader else 1
            group = cols // groups if groups and cols % groups == 0 else cols
        for stored, (_, stored_shape, _) in zip(quantized_names(name, bits), array_specs(rows, cols, bits, group)):
            shapes[stored] = stored_shape
    for prefix, layout in layouts.items():
        for e in range(model.config.num_experts):
            shapes[packed_expert_name(prefix, e)] = (layout.nbytes,)
    return shapes
