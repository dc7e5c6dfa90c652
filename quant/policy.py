"""Which tensor is stored at which precision.

Routed experts (about 95% of the real model's bytes) take the requested bits. The rest follows
what public recipes for this model family keep and what our measurements support
(docs/quantization.md): routers and the shared-expert gate stay in full precision (a mis-routed
token or a wrong shared-expert scale hurts every layer after it), as do norms, the DeltaNet conv,
A_log and dt_bias (tiny, and sensitive); attention and DeltaNet projections, the shared expert,
the MTP fc, embeddings and lm_head go to 8 bits.
"""

from __future__ import annotations

import re

KEEP = None  # stored as in the source checkpoint

_FULL_PRECISION = re.compile(
    r"(\.mlp\.gate\.weight|shared_expert_gate\.weight|(^|\.)\w*norm\w*\.weight|conv1d\.weight|A_log|dt_bias)$"
)
_ROUTED_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")


def default_bits(name: str, expert_bits: int) -> int | None:
    """Bits for tensor `name` (a hub name) under the default policy, or KEEP."""
    if _FULL_PRECISION.search(name):
        return KEEP
    if _ROUTED_EXPERT.search(name):
        return expert_bits
    return 8
