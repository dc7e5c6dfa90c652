"""Memory budgets: sizes as users write them, and what a budget leaves for routed-expert slots.

The budget covers everything the model holds: always-active weights, the KV cache and recurrent
state for the chosen context, the expert slots and the read buffers. What it does not cover is the
runtime itself (Python, torch, the tokenizer: RUNTIME_OVERHEAD, stated in docs and measured by a test).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psutil

from qwen3next.errors import RequestError

RUNTIME_OVERHEAD = 600 * 2**20  # Python + torch + tokenizer, outside the budget (tests/test_offload.py measures it)
FREE_MEMORY_MARGIN = 0.10  # the default budget leaves this share of available memory to the rest of the machine

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int, field: str) -> int:
    """Bytes for "12G" / "12GiB" / "512M" / "1.5G" / "12GB" (K, M, G, T and KiB... are binary; KB, MB, GB,
    TB decimal; a bare number is bytes). A malformed or negative size is a RequestError naming `field`."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise RequestError(field, text, "a size cannot be negative")
        return text
    if not isinstance(text, str):
        raise RequestError(field, text, "must be a size such as 12G")
    if text.strip().startswith("-"):
        raise RequestError(field, text, "a size cannot be negative")
    match = _SIZE.match(text)
    unit = match and _UNITS.get(match.group(2).lower())
    if not match or unit is None:
        raise RequestError(field, text, "not a size (use e.g. 12G, 12GiB, 512M, 1.5G)")
    return int(float(match.group(1)) * unit)


def format_size(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def default_cpu_budget() -> int:
    """Available RAM now, less a margin for the rest of the machine and the runtime itself."""
    available = psutil.virtual_memory().available
    return max(0, int(available * (1 - FREE_MEMORY_MARGIN)) - RUNTIME_OVERHEAD)


def check_cpu_budget(budget: int, flag: str = "--cpu-mem") -> str | None:
    """A warning when the budget exceeds the machine's memory (the run may swap or be killed), else None."""
    total = psutil.virtual_memory().total
    if budget > total:
        return (f"{flag} {format_size(budget)} is more than this machine's {format_size(total)} of RAM; "
                "the process may swap or be killed")
    return None


@dataclass(frozen=True)
class ExpertPlan:
    """How a CPU budget splits: what must stay, and how many routed-expert slots the rest pays for."""

    budget: int
    always_active: int  # dense weights: embeddings, attention, DeltaNet, norms, routers, shared experts, lm_head
    context_state: int  # KV cache for max_context tokens plus the recurrent states
    max_context: int
    prefill_state: int  # working memory of one prefill chunk of prefill_tokens (counted when experts come from disk)
    prefill_tokens: int
    read_buffers: int  # the minimum slots every step needs (one token's experts), counted apart
    slot_bytes: int
    slots: int  # expert slots, the read buffers included
    experts: int  # routed experts in the checkpoint

    @property
    def fully_resident(self) -> bool:
        return self.slots >= self.experts

    def budget_for_slots(self, slots: int) -> int:
        """The budget whose plan has exactly `slots` slots, all else as in this plan (a plan with experts on
        disk: what it reserves beside the slots does not depend on the budget)."""
        return self.always_active + self.context_state + self.prefill_state + slots * self.slot_bytes

    def summary(self) -> str:
        share = min(self.slots, self.experts) / self.experts if self.experts else 1.0
        return (f"memory plan: {format_size(self.budget)} budget = {format_size(self.always_active)} always-active "
                f"weights + {format_size(self.context_state)} context state ({self.max_context} tokens) + "
                + (f"{format_size(self.prefill_state)} prefill working memory ({self.prefill_tokens}-token chunks) + "
                   if self.prefill_state else "")
                + f"{min(self.slots, self.experts)} expert slots of {format_size(self.slot_bytes)} "
                f"({share:.0%} of {self.experts} experts" + (", all resident)" if self.fully_resident else
                                                              ", the rest read from disk)"))


def plan_experts(budget: int, always_active: int, state_bytes_fixed: int, kv_bytes_per_token: int,
                 max_context: int, slot_bytes: int, experts: int, min_slots: int, field: str = "cpu_mem",
                 prefill_state: int = 0, prefill_tokens: int = 0) -> ExpertPlan:
    """Split `budget`; a budget that cannot hold the always-active weights, the context state, the prefill
    working memory and `min_slots` slots is a RequestError naming the bytes needed."""
    context_state = state_bytes_fixed + kv_bytes_per_token * max_context
    read_buffers = min_slots * slot_bytes
    needed = always_active + context_state + prefill_state + read_buffers
    if budget < needed:
        prefill = f"{format_size(prefill_state)} to prefill {prefill_tokens}-token chunks, " if prefill_state else ""
        raise RequestError(field, format_size(budget), (
            f"too small; the model needs at least {format_size(needed)} ({needed} bytes: "
            f"{format_size(always_active)} always-active weights, {format_size(context_state)} for {max_context} "
            f"tokens of context, {prefill}{format_size(read_buffers)} for one step's experts; a smaller "
            "max_context lowers the second)"))
    slots = min(experts, (budget - always_active - context_state - prefill_state) // slot_bytes)
    return ExpertPlan(budget, always_active, context_state, max_context, prefill_state, prefill_tokens, read_buffers,
                      slot_bytes, slots, experts)


def context_for_budget(budget: int, always_active: int, state_bytes_fixed: int, kv_bytes_per_token: int,
                       slot_bytes: int, min_slots: int, model_context: int) -> int:
    """The longest context the budget leaves room for after the always-active weights and one step's experts."""
    spare = budget - always_active - state_bytes_fixed - min_slots * slot_bytes
    if kv_bytes_per_token <= 0:
        return model_context
    return max(0, min(model_context, spare // kv_bytes_per_token))
