"""Generation state kept between requests, so a chat turn prefills only what is new.

Chat clients resend the whole conversation every turn. The engine keeps one live ModelCache and,
at turn boundaries (the end of a prompt, the end of a reply), a few snapshots of it labelled with
the token ids they hold. A new prompt starts from the longest snapshot that is a prefix of it.

The two kinds of layer state are kept differently (cache.py): a DeltaNet state is overwritten in
place, so each snapshot copies it (tens of MB on the full model: hence a small bound); a KV cache
only appends, so a snapshot remembers its length and shares the live buffers. That sharing holds
while nothing before the snapshot's length is rewritten, i.e. while its tokens are a prefix of what
the live cache holds; restoring a snapshot drops every longer one, since the new prompt writes
past it. One live cache means one conversation at a time is resumed: a different conversation
starts afresh (and drops the other's snapshots).
"""

from __future__ import annotations

from typing import Callable, Sequence

from .cache import ModelCache

SNAPSHOTS = 4  # the last two turns' prompt and reply ends: enough to resume one conversation


class PrefixStates:
    """The live cache plus up to `limit` snapshots of it at token boundaries."""

    def __init__(self, make_cache: Callable[[], ModelCache], limit: int = SNAPSHOTS):
        if limit < 1:
            raise ValueError("PrefixStates keeps at least one snapshot")
        self._make_cache = make_cache
        self._limit = limit
        self._cache: ModelCache | None = None
        self._saved: list[tuple[tuple[int, ...], tuple]] = []  # (tokens held, ModelCache.snapshot()), oldest first

    def start(self, ids: Sequence[int]) -> tuple[ModelCache, int]:
        """The cache to generate `ids` with and how many of them it already holds (at most all but the
        last: the last prompt token's logits are what the first new token is drawn from)."""
        ids = tuple(ids)
        usable = [entry for entry in self._saved if len(entry[0]) < len(ids) and ids[: len(entry[0])] == entry[0]]
        if not usable:
            self._saved = []
            self._cache = self._make_cache()
            return self._cache, 0
        tokens, saved = max(usable, key=lambda entry: len(entry[0]))
        self._cache.restore(saved)
        self._saved = [entry for entry in self._saved if len(entry[0]) <= len(tokens)]  # the rest get overwritten
        return self._cache, len(tokens)

    def keep(self, tokens: Sequence[int]) -> None:
        """Snapshot the live cache, which holds exactly `tokens` (the oldest snapshot goes past the limit)."""
        tokens = tuple(tokens)
        if self._cache is None or self._cache.position != len(tokens):
            raise ValueError(f"the cache holds {getattr(self._cache, 'position', 0)} positions, not {len(tokens)}")
        self._saved = [entry for entry in self._saved if entry[0] != tokens]
        self._saved.append((tokens, self._cache.snapshot()))
        del self._saved[: -self._limit]

    def __len__(self) -> int:
        return len(self._saved)
