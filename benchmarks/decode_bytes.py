"""Bytes of weights one decoded token reads, per component, under quantization policies: computed, not timed.

    python benchmarks/decode_bytes.py [--layers 48] [--bandwidth 26] [--policy "FLAGS"]...

The model is Qwen3-Next-80B-A3B's layout (tests/checkpoints.py size "real" with the real vocabulary,
--layers layers: hidden 2048, 3 DeltaNet : 1 attention, 512 experts of 512 top-10, shared expert 512,
16/2 attention heads of 256, 16/32 DeltaNet heads of 128), shapes from a model built on the meta
device. A decode step reads every dense matrix of the main model once, num_experts_per_tok of each
layer's routed experts, and one row of the embeddings; the MTP layer is read only when it drafts a
token, so it is listed apart. Stored sizes are docs/format.md's (int8: a byte per weight and an fp32
scale per row; int4: half a byte and two fp16 per group); tensors a policy keeps count at bf16.
Decode on a CPU is bound by reading weights, so a policy's time per token is estimated as its bytes
over --bandwidth GB/s (default: the ~26 GB/s the development machine's kernels stream large int8
and int4 matrices at, docs/performance.md). Each --policy is a `qwen3next quantize` flag string.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from checkpoints import make_config  # noqa: E402

from qwen3next.checkpoint_names import is_routed_expert, model_shapes  # noqa: E402
from qwen3next.cli.quantize import quantize_command  # noqa: E402
from qwen3next.config import Qwen3NextConfig  # noqa: E402
from qwen3next.quant import int4  # noqa: E402
from qwen3next.quant.layout import array_specs  # noqa: E402
from qwen3next.quant.policy import Policy, parse_bits_for  # noqa: E402

POLICIES = [
    "--bits 4",
    "--bits 4 --bits-for lm_head.weight=4",
    "--bits 4 --bits-for lm_head.weight=4 --group-size 32",
    "--bits 4 --group-size 32",
    "--bits 4 --bits-for '*.self_attn.*=4' --bits-for '*.linear_attn.*=4'",
    "--bits 4 --bits-for '*.shared_expert.*=4'",
    "--bits 8",
]
MTP = "MTP layer (read when drafting)"
# (label, glob over hub names); the first match names a tensor's component
COMPONENTS = [
    (MTP, "mtp.*"),
    ("embeddings (one row)", "model.embed_tokens.weight"),
    ("lm_head", "lm_head.weight"),
    ("routed experts (10 of 512 a layer)", "*.mlp.experts.*"),
    ("attention projections", "*.self_attn.*_proj.weight"),
    ("DeltaNet projections", "*.linear_attn.*_proj*.weight"),
    ("shared experts", "*.mlp.shared_expert.*"),
    ("routers and shared-expert gates (kept)", "*gate.weight"),
    ("norms, conv1d, A_log, dt_bias (kept)", "*"),
]
CHOICES = {"bf16": (None, 64), "8-bit": (8, 64), "4-bit": (4, 64), "4-bit, groups of 32": (4, 32)}  # (bits, group)


def policy_from_flags(flags: str) -> tuple[Policy, int]:
    """(policy, group size) of a `qwen3next quantize` flag string, parsed by the command itself."""
    params = quantize_command.make_context("quantize", ["SRC", "OUT", *shlex.split(flags)]).params
    policy = Policy(int(params["bits"]), keep=params["keep"], bits_for=parse_bits_for(params["bits_for"]))
    return policy, int(params["group_size"])


def stored_bytes(shape: tuple[int, ...], bits: int | None, group: int) -> int:
    if bits is None or len(shape) != 2:
        return 2 * math.prod(shape)  # bf16, as the hub checkpoint stores it
    return sum(size for *_, size in array_specs(*shape, bits, int4.group_for(shape[1], group)))


def component(name: str) -> str:
    return next(label for label, pattern in COMPONENTS if fnmatch.fnmatchcase(name, pattern))


def read_fraction(name: str, config: Qwen3NextConfig) -> float:
    """The share of a stored tensor one decoded token reads."""
    if is_routed_expert(name):
        return config.num_experts_per_tok / config.num_experts
    if name == "model.embed_tokens.weight":
        return 1 / config.vocab_size
    return 1.0


def bytes_per_token(shapes: dict, config: Qwen3NextConfig, bits_of, group: int) -> dict[str, float]:
    """Bytes read per decoded token by component; bits_of(name) gives a tensor's bits (None: bf16)."""
    totals = {label: 0.0 for label, _ in COMPONENTS}
    for name, shape in shapes.items():
        totals[component(name)] += stored_bytes(shape, bits_of(name), group) * read_fraction(name, config)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--bandwidth", type=float, default=26.0, help="GB/s of weights read at decode")
    parser.add_argument("--policy", action="append", help="qwen3next quantize flags (repeatable)")
    args = parser.parse_args()
    raw = make_config("real", vocab_size=151936, first_special_id=151643, num_hidden_layers=args.layers)
    config = Qwen3NextConfig.from_dict(raw)
    shapes = model_shapes(config, with_mtp=True)
    print(f"Qwen3-Next-80B-A3B layout, {args.layers} layers: {sum(map(math.prod, shapes.values())) / 1e9:.2f}B "
          "parameters with the MTP layer; MB read per decoded token")

    default, group = policy_from_flags("--bits 4")
    columns = {}
    for label, (bits, choice_group) in CHOICES.items():  # every tensor the default policy quantizes, at this choice
        columns[label] = bytes_per_token(shapes, config, lambda n, b=bits: None if default.bits(n) is None else b,
                                         choice_group)
    chosen = bytes_per_token(shapes, config, default.bits, group)
    decode = {label: value for label, value in chosen.items() if label != MTP}
    total = sum(decode.values())
    header = ["component", *CHOICES, "default `--bits 4`", "share"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for label, _ in COMPONENTS:
        share = f"{chosen[label] / total:.1%}" if label in decode else "(not at decode)"
        cells = [f"{columns[c][label] / 1e6:,.1f}" for c in CHOICES]
        print(f"| {label} | " + " | ".join(cells) + f" | {chosen[label] / 1e6:,.1f} | {share} |")
    print("| **a decoded token** | " + " | ".join(
        f"{sum(v for k, v in columns[c].items() if k in decode) / 1e6:,.1f}" for c in CHOICES)
        + f" | **{total / 1e6:,.1f}** | 100% |")

    print(f"\npolicy: MB per decoded token, estimated ms at {args.bandwidth:g} GB/s, vs `--bits 4`")
    print("| `qwen3next quantize` flags | MB/token | ms/token | vs `--bits 4` |\n|---|---|---|---|")
    for flags in args.policy or POLICIES:
        policy, policy_group = policy_from_flags(flags)
        mb = sum(v for k, v in bytes_per_token(shapes, config, policy.bits, policy_group).items() if k != MTP) / 1e6
        print(f"| `{flags}` | {mb:,.1f} | {mb / args.bandwidth:.1f} | {mb / (total / 1e6) - 1:+.1%} |")


if __name__ == "__main__":
    main()
