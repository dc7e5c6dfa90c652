"""Speculative decoding with the model's own MTP head: draft, verify in one pass, accept, roll back.

Each step the MTP head drafts n tokens (the first from the main model's final hidden state at the
newest fed position and the newest token, each later one from the head's own output and the
previous draft). The main model then runs the newest token and the drafts through
`decode_steps`, which computes every position exactly as a one-token decode step does, so its
logits are the bits plain decoding would get. An acceptance rule turns them into 1 to n + 1 tokens:
greedy keeps the longest prefix of drafts equal to the main model's choices plus its own next token
(the plain greedy output, token for token); sampling uses the speculative-sampling rule, whose
tokens have the plain sampler's distribution exactly.

Rolling back: attention layers truncate their KV cache (free); DeltaNet layers take the state the
verify pass kept for the last accepted position (ModelCache.rewind). No accepted token is run again.
"""

from __future__ import annotations

import time
from typing import Iterator, Sequence

import torch

from . import cpu_kernels
from .cache import ModelCache
from .generate import finish_reason, prefill
from .model import Qwen3NextForCausalLM
from .request import PREFILL_CHUNK, Timings
from .sampling import Sampler


class GreedyRule:
    """Drafts are the head's greedy choices; the main model's greedy choice at each position decides."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    def propose(self, logits: torch.Tensor, history: torch.Tensor | None) -> int:
        return self.sampler(logits, history)

    def accept(self, logits: torch.Tensor, drafts: list[int], history: list[int], use_history: bool) -> list[int]:
        """The accepted drafts, then the main model's own next token; logits [len(drafts) + 1, vocab]."""
        run: list[int] = []
        for i in range(len(drafts) + 1):
            run.append(self.sampler(logits[i], torch.tensor(history + run) if use_history else None))
            if i == len(drafts) or run[-1] != drafts[i]:
                break
        return run


class SamplingRule:
    """Speculative sampling: draft d ~ q (the head's filtered distribution) is kept with probability
    min(1, p(d) / q(d)) against the main model's filtered distribution p; the first rejected one is replaced
    by a draw from max(0, p - q), normalised. Each token then has exactly p's distribution (every filter
    and the repetition penalty included, as Sampler.probabilities applies them), whatever q is."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.drafted: list[torch.Tensor] = []  # q for each draft of the current step

    def propose(self, logits: torch.Tensor, history: torch.Tensor | None) -> int:
        q = self.sampler.probabilities(logits, history)
        self.drafted.append(q)
        return self.sampler.sample(q)

    def accept(self, logits: torch.Tensor, drafts: list[int], history: list[int], use_history: bool) -> list[int]:
        drafted, self.drafted = self.drafted, []
        run: list[int] = []
        for i in range(len(drafts) + 1):
            p = self.sampler.probabilities(logits[i], torch.tensor(history + run) if use_history else None)
            if i == len(drafts):
                run.append(self.sampler.sample(p))
                break
            d, q = drafts[i], drafted[i]
            if self.sampler.uniform() * float(q[d]) < float(p[d]):  # u < p/q; q[d] > 0 as d was drawn from q
                run.append(d)
                continue
            residual = (p - q).clamp_(min=0)
            run.append(self.sampler.sample(residual if residual.sum() > 0 else p))  # p == q: no residual mass
            break
        return run


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
        with the token after each. Returns the head's last output [1, 1, hidden].

        A few positions on the CPU kernels take them row by row (faster than the prefill paths at that size)."""
        device = hidden.device
        cos_sin = self.model.rotary.cos_sin(torch.arange(start, start + hidden.shape[1], device=device), hidden.dtype)
        embeds = self.model.model.embed_tokens(torch.tensor([list(next_tokens)], device=device))
        few = cpu_kernels.usable(hidden) and hidden.shape[1] <= cpu_kernels.MAX_ROWS
        return self.model.mtp(hidden, embeds, cos_sin, self.caches, as_steps=few)[:, -1:]

    def draft(self, hidden: torch.Tensor, next_tokens: Sequence[int], start: int, n: int, rule,
              history: list[int] | None) -> list[int]:
        """n draft tokens following next_tokens[-1], after feeding the known positions (as `feed`); `rule`
        picks each from the head's logits (with `history`, the ids so far, for a repetition penalty)."""
        out = self.feed(hidden, next_tokens, start)
        known = [kv.length for kv in self.caches]
        drafts: list[int] = []
        position = start + hidden.shape[1]
        while True:
            seen = None if history is None else torch.tensor(history + drafts)
            drafts.append(rule.propose(self.model.logits_from_hidden(out)[0, -1], seen))
            if len(drafts) == n:
                break
            out = self.feed(out, drafts[-1:], position)
            position += 1
        for kv, length in zip(self.caches, known):
            kv.restore(length)
        return drafts


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
    """generate_ids with up to `draft_tokens` drafts verified per main-model pass.

    The same contract: greedy, the same (token, finish reason) pairs; sampling, the same distribution
    (reproducible for one seed and one draft_tokens). While a token is being yielded the cache holds
    the prompt and every earlier new token (it is rewound inside the accepted run)."""
    device = model.model.norm.weight.device
    limit = min(max_new_tokens, context_length - len(prompt_ids))
    if limit <= 0:
        return
    eos = set(eos_ids)
    if cache is None:
        cache = model.make_cache(context_length)
    drafter = Drafter(model, cache)
    rule = GreedyRule(sampler) if sampler.params.temperature == 0 else SamplingRule(sampler)
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
            drafts = drafter.draft(rows, row_tokens, row_start, n, rule, history if use_history else None) if n else []
            position = cache.position
            hidden, logits, states = model.decode_steps(torch.tensor([history[-1:] + drafts], device=device), cache)
            run = rule.accept(logits[0], drafts, history, use_history)
        timings.decode_seconds += time.perf_counter() - started
        timings.count_verify(len(drafts), len(run) - 1)
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
