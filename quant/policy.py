"""Which tensor is stored at which precision.

Routed experts (about 95% of the real model's bytes, 29% of what a decoded token reads) take the
requested bits. Every other matrix goes to 8 bits, lm_head included: on the real model's 48 layers
it is 6% of a 4-bit decode step's bytes at 4 bits and 11% at 8, so 8 bits costs ~5% of decode speed,
and on the demo model it removes most of what 4-bit costs in perplexity (+0.52% -> +0.05% on held-out
Austen/Shakespeare, +0.92% -> +0.21% on modern English; docs/quantization.md has the tables and
commands). `--bits-for lm_head.weight=4` buys that speed back; the attention and DeltaNet
projections at 4 bits are the larger trade (23% fewer bytes a token). Routers and the shared-expert
gate stay in full precision (a mis-routed token or a wrong shared-expert scale hurts every layer
after it), as do norms, the DeltaNet conv, A_log and dt_bias (tiny, and sensitive). Embeddings are
at 8 bits: a lookup reads one row, so fewer bits would save disk but no time.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Iterable

from qwen3next.checkpoint_names import is_routed_expert
from qwen3next.errors import UsageError

KEEP = None  # stored as in the source checkpoint

_FULL_PRECISION = re.compile(
    r"(\.mlp\.gate\.weight|shared_expert_gate\.weight|(^|\.)\w*norm\w*\.weight|conv1d\.weight|A_log|dt_bias)$"
)


def default_bits(name: str, expert_bits: int) -> int | None:
    """Bits for tensor `name` (a hub name) under the default policy, or KEEP."""
    if _FULL_PRECISION.search(name):
        return KEEP
    if is_routed_expert(name):
        return expert_bits
    return 8


class Policy:
    """The default policy plus the user's overrides, as `qwen3next quantize` applies them.

    Patterns are shell-style globs over hub tensor names (`*.self_attn.*`, `lm_head.weight`).
    Later `bits_for` entries win over earlier ones and `keep` wins over all; only matrices are
    ever quantized. Routed experts cannot be kept: the offloading layout stores them quantized.
    """

    def __init__(self, expert_bits: int, keep: Iterable[str] = (), bits_for: Iterable[tuple[str, int]] = ()):
        if expert_bits not in (4, 8):
            raise UsageError(f"--bits must be 4 or 8, not {expert_bits}")
        self.expert_bits = expert_bits
        self.keep = tuple(keep)
        self.bits_for = tuple(bits_for)
        for pattern, bits in self.bits_for:
            if bits not in (4, 8):
                raise UsageError(f"--bits-for {pattern}={bits}: bits must be 4 or 8")

    def bits(self, name: str) -> int | None:
        bits = default_bits(name, self.expert_bits)
        for pattern, pattern_bits in self.bits_for:
            if fnmatch.fnmatchcase(name, pattern):
                bits = pattern_bits
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.keep):
            if is_routed_expert(name):
                raise UsageError(f"--keep {self._keeping(name)}: routed experts are always quantized "
                                 f"(use --bits-for PATTERN=8 for more precision), but it matches {name}")
            bits = KEEP
        return bits

    def _keeping(self, name: str) -> str:
        return next(p for p in self.keep if fnmatch.fnmatchcase(name, p))

    def check_patterns_match(self, names: Iterable[str]) -> None:
        """A pattern that matches no tensor is almost always a typo: say so instead of ignoring it."""
        names = list(names)
        for flag, patterns in (("--keep", self.keep), ("--bits-for", [p for p, _ in self.bits_for])):
            for pattern in patterns:
                if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    raise UsageError(f"{flag} {pattern!r} matches no tensor of the checkpoint "
                                     "(patterns are globs over hub names, e.g. '*.self_attn.*')")

    def describe(self) -> dict:
        return {"bits": self.expert_bits, "keep": list(self.keep), "bits_for": [f"{p}={b}" for p, b in self.bits_for]}


def parse_bits_for(values: Iterable[str]) -> list[tuple[str, int]]:
    """`PATTERN=BITS` strings (the --bits-for flag) -> (pattern, bits)."""
    parsed = []
    for value in values:
        pattern, sep, bits = value.rpartition("=")
        if not sep or not pattern or not bits.strip().isdigit():
            raise UsageError(f"--bits-for {value!r}: expected PATTERN=BITS, e.g. '*.self_attn.*=4'")
        parsed.append((pattern, int(bits)))
    return parsed
