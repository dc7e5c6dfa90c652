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

from typing import Sequence

import torch

from . import cpu_kernels
from .cache import ModelCache
from .model import Qwen3NextForCausalLM
from .request import Timings
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
        cos_sin = self.model.rotary.cos_sin_range(start, hidden.shape[1], device, hidden.dtype)
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


class Speculation:
    """The speculative step of generate_ids(draft_tokens=n): draft, verify in one pass, accept; then rewind
    the cache to each accepted token as generate_ids yields it.

    `history` is generate_ids' own list (prompt and tokens so far, appended to as tokens are yielded).
    The head still has to see `pending`: hidden rows [1, R, hidden] of the main model from position
    `start`, whose next tokens are history[start + 1 : start + 1 + R] once they are known."""

    def __init__(self, model: Qwen3NextForCausalLM, cache: ModelCache, sampler: Sampler, history: list[int],
                 draft_tokens: int, timings: Timings):
        self.model, self.cache, self.history, self.draft_tokens, self.timings = model, cache, history, draft_tokens, timings
        self.drafter = Drafter(model, cache)
        self.rule = GreedyRule(sampler) if sampler.params.temperature == 0 else SamplingRule(sampler)
        self.use_history = sampler.params.repetition_penalty != 1.0
        self.pending: tuple[torch.Tensor, int] | None = None
        self.position, self.states = 0, []  # where the last verify pass started, and its kept states

    def see_prompt(self, hidden: torch.Tensor, start: int) -> None:
        """prefill's on_hidden: feed the head the chunk's rows whose next token is in the prompt; the chunk's
        last row waits for the first new token."""
        known = min(start + hidden.shape[1], len(self.history) - 1) - start
        if known > 0:
            self.drafter.feed(hidden[:, :known], self.history[start + 1 : start + 1 + known], start)
        self.pending = (hidden[:, -1:], start + hidden.shape[1] - 1)

    def step(self, left: int) -> list[int]:
        """The next 1 to n + 1 tokens, drafting no more than the `left` tokens still allowed need."""
        history, n = self.history, min(self.draft_tokens, left - 1)
        hidden, start = self.pending
        device = hidden.device
        with torch.inference_mode():
            seen = history if self.use_history else None
            next_tokens = history[start + 1 : start + 1 + hidden.shape[1]]
            drafts = self.drafter.draft(hidden, next_tokens, start, n, self.rule, seen) if n else []
            self.position = self.cache.position
            hidden, logits, self.states = self.model.decode_steps(torch.tensor([history[-1:] + drafts], device=device),
                                                                  self.cache)
            run = self.rule.accept(logits[0], drafts, history, self.use_history)
        self.timings.count_verify(len(drafts), len(run) - 1)
        self.pending = (hidden[:, : len(run)], self.position)
        return run

    def rewind(self, k: int) -> None:
        """Leave the cache holding the tokens before the k-th of the last step's run (and that token's input)."""
        self.cache.rewind(self.position + k + 1, self.states[k])
