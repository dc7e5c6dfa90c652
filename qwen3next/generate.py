"""The token loop: chunked prefill, then one decode step per new token, with timing.

Prefill runs the prompt through the model in chunks so peak memory follows the chunk size,
not the prompt length; only the last position's logits are computed (lm_head over a 152k
vocabulary is costly). Each model call has its own inference_mode block: holding one open
across `yield` would leak it into the caller's code.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator, Sequence

import torch

from . import cpu_kernels
from .cache import ModelCache
from .model import Qwen3NextForCausalLM
from .request import PREFILL_CHUNK, Timings
from .sampling import Sampler
from .speculative import Speculation

def prefill(model: Qwen3NextForCausalLM, ids: torch.Tensor, cache, chunk: int = PREFILL_CHUNK,
            on_hidden: Callable[[torch.Tensor, int], None] | None = None) -> torch.Tensor:
    """Run ids [1, T] into `cache` chunk by chunk; return the last position's logits [vocab].

    `on_hidden(hidden, start)` sees each chunk's final hidden states and first position (the MTP drafter's input)."""
    for start in range(0, ids.shape[1], chunk):
        with torch.inference_mode():
            first = cache.position
            hidden = model.hidden_states(ids[:, start : start + chunk], cache)
            if on_hidden is not None:
                on_hidden(hidden, first)
            logits = model.logits_from_hidden(hidden[:, -1:])
    return logits[0, -1]


def finish_reason(token: int, eos: set[int], produced: int, limit: int) -> str | None:
    """Why generation ends after the `produced`-th new token, if it does: "stop" (an eos id) or "length"."""
    return "stop" if token in eos else "length" if produced == limit else None


def generate_ids(
    model: Qwen3NextForCausalLM,
    prompt_ids: Sequence[int],
    sampler: Sampler,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    context_length: int,
    timings: Timings,
    prefill_chunk: int = PREFILL_CHUNK,
    cache: ModelCache | None = None,
    cached: int = 0,
    draft_tokens: int = 0,
) -> Iterator[tuple[int, str | None]]:
    """Yield (token id, finish reason) for each new token: None until the last, then "stop" (an eos
    id) or "length" (max_new_tokens or the end of the context). `timings` is filled in as it goes.

    `cache` may already hold the first `cached` prompt tokens (a kept chat turn): only the rest are
    prefilled. While a token is being yielded the cache holds the prompt and every earlier new token.
    draft_tokens > 0: speculative decoding with the MTP head (speculative.py), up to that many drafts per
    main-model pass: greedy, the same tokens; sampling, the same distribution (reproducible for one seed
    and one draft_tokens)."""
    device = model.model.norm.weight.device
    limit = min(max_new_tokens, context_length - len(prompt_ids))
    if limit <= 0:
        return
    eos = set(eos_ids)
    if cache is None:
        cache = model.make_cache(context_length)
    history = list(prompt_ids)
    use_history = sampler.params.repetition_penalty != 1.0
    speculation = Speculation(model, cache, sampler, history, draft_tokens, timings) if draft_tokens else None

    def plain_step(left: int) -> list[int]:
        with torch.inference_mode():
            logits = model(torch.tensor([history[-1:]], device=device), cache)[0, -1]
        return [sampler(logits, torch.tensor(history) if use_history else None)]

    fixed = cpu_kernels.WeightsFixed()  # entered around each step below, never across a yield
    started = time.perf_counter()
    with fixed:
        logits = prefill(model, torch.tensor([history[cached:]], device=device), cache, prefill_chunk,
                         None if speculation is None else speculation.see_prompt)
    run = [sampler(logits, torch.tensor(history) if use_history else None)]  # the first token, from prefill
    timings.prefill_seconds = time.perf_counter() - started
    step = plain_step if speculation is None else speculation.step
    decoded = False
    while True:
        for k, token in enumerate(run):
            if decoded:
                timings.decode_steps += 1
                if speculation is not None:
                    speculation.rewind(k)
            history.append(token)
            finish = finish_reason(token, eos, len(history) - len(prompt_ids), limit)
            yield token, finish
            if finish:
                return
        started = time.perf_counter()
        with fixed:
            run, decoded = step(limit - (len(history) - len(prompt_ids))), True
        timings.decode_seconds += time.perf_counter() - started


class StopStrings:
    """Cuts streamed text at the first stop string, holding back text that may be the start of one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was found)."""
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending = self.pending[: min(found)], ""
            return out, True
        hold = max(
            (k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])),
            default=0,
        )
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
