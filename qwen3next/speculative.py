"""Speculative decoding with the model's own MTP head: draft, verify in one pass, accept, roll back.

Each step the MTP head drafts n tokens (the first from the main model's final hidden state at the
newest fed position and the newest token, each later one from the head's own output and the
previous draft). The main model then runs the newest token and the drafts through
`decode_steps`, which computes every position exactly as a one-token decode step does, so the
main model's choices are the bits plain decoding would get and greedy output is the same token
for token. The longest prefix of drafts equal to those choices is accepted, plus the main
model's own next token.

Rolling back: attention layers truncate their KV cache (free). A DeltaNet state is overwritten in
place, so the verify pass copies each DeltaNet layer's conv and recurrent state after every
position but the last (n copies per layer and step; none is re-run), and the cache takes the copy
for the last accepted position. Greedy decoding only: the sampling acceptance rule is not built.
"""

from __future__ import annotations

import time
from typing import Iterator, Sequence

import torch

from .cache import ModelCache
from .generate import finish_reason, prefill
from .model import Qwen3NextForCausalLM
from .request import PREFILL_CHUNK, Timings
from .sampling import Sampler


class Drafter:
    """The MTP head run over the main model's hidden states, with its KV caches in `cache.mtp`.

    The head's cache holds an entry per position whose main hidden state and next token are both
    known; its drafts past that are chained on its own output and dropped once drafted (the next
    step recomputes those positions from the main model's states).
    """

    def __init__(self, model: Qwen3NextForCausalLM, cache: ModelCache):
        self.model, self.caches = model, cache.mtp

    def feed(self, hidden: torch.Tensor, next_tokens: Sequence[int], start: int) -> torch.Tensor:
        """Run the head on positions start.. : hidden [1, T, hidden] (main model, or the head's own output)
        with the token after each. Returns the head's last output [1, 1, hidden]."""
        device = hidden.device
        cos_sin = self.model.rotary.cos_sin(torch.arange(start, start + hidden.shape[1], device=device), hidden.dtype)
        embeds = self.model.model.embed_tokens(torch.tensor([list(next_tokens)], device=device))
        return self.model.mtp(hidden, embeds, cos_sin, self.caches)[:, -1:]

    def draft(self, hidden: torch.Tensor, next_tokens: Sequence[int], start: int, n: int) -> list[int]:
        """n draft tokens following next_tokens[-1], after feeding the known positions (as `feed`)."""
        out = self.feed(hidden, next_tokens, start)
        known = [kv.length for kv in self.caches]
        drafts = [self._best(out)]
        for position in range(start + hidden.shape[1], start + hidden.shape[1] + n - 1):
            out = self.feed(out, drafts[-1:], position)
            drafts.append(self._best(out))
        for kv, length in zip(self.caches, known):
            kv.restore(length)
        return drafts

    def _best(self, out: torch.Tensor) -> int:
        return int(self.model.logits_from_hidden(out)[0, -1].argmax())


def speculative_ids(
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
    draft_tokens: int = 1,
) -> Iterator[tuple[int, str | None]]:
    """generate_ids with up to `draft_tokens` drafts verified per main-model pass (greedy `sampler` only).

    The same contract: the same (token, finish reason) pairs, and while a token is being yielded the
    cache holds the prompt and every earlier new token (it is rewound inside the accepted run)."""
    if sampler.params.temperature != 0:
        raise ValueError("speculative_ids: greedy decoding only")
    device = model.model.norm.weight.device
    limit = min(max_new_tokens, context_length - len(prompt_ids))
    if limit <= 0:
        return
    eos = set(eos_ids)
    if cache is None:
        cache = model.make_cache(context_length)
    drafter = Drafter(model, cache)
    history = list(prompt_ids)
    use_history = sampler.params.repetition_penalty != 1.0
    last_hidden = []  # the prompt's last hidden state: the head sees it once the first new token is known

    def to_drafter(hidden: torch.Tensor, start: int) -> None:
        known = min(start + hidden.shape[1], len(history) - 1) - start  # rows whose next token is in the prompt
        if known > 0:
            drafter.feed(hidden[:, :known], history[start + 1 : start + 1 + known], start)
        last_hidden[:] = [hidden[:, -1:]]

    started = time.perf_counter()
    logits = prefill(model, torch.tensor([history[cached:]], device=device), cache, prefill_chunk, to_drafter)
    token = sampler(logits, torch.tensor(history) if use_history else None)
    history.append(token)
    timings.prefill_seconds = time.perf_counter() - started
    produced = 1
    finish = finish_reason(token, eos, produced, limit)
    yield token, finish
    if finish:
        return
    rows, row_tokens, row_start = last_hidden[0], [token], len(prompt_ids) - 1
    while True:
        started = time.perf_counter()
        n = min(draft_tokens, limit - produced - 1)  # never draft past max_new_tokens or the context
        with torch.inference_mode():
            drafts = drafter.draft(rows, row_tokens, row_start, n) if n else []
            position = cache.position
            hidden, logits, states = model.decode_steps(torch.tensor([history[-1:] + drafts], device=device), cache)
            run = []  # the main model's choices: the accepted drafts, then its own next token
            for i in range(len(drafts) + 1):
                run.append(sampler(logits[0, i], torch.tensor(history + run) if use_history else None))
                if i == len(drafts) or run[-1] != drafts[i]:
                    break
        timings.decode_seconds += time.perf_counter() - started
        timings.verify_steps += 1
        timings.drafted += len(drafts)
        timings.accepted += len(run) - 1
        for k, token in enumerate(run):
            cache.rewind(position + k + 1, states[k])
            history.append(token)
            produced += 1
            timings.decode_steps += 1
            finish = finish_reason(token, eos, produced, limit)
            yield token, finish
            if finish:
                return
        rows, row_tokens, row_start = hidden[:, : len(run)], run, position
