"""Prefetch: start reading the experts later layers will choose while earlier layers compute.

Signals, measured on the demo model's real routing (the design figures here come from the first half of
tests/data/heldout.txt; benchmarks/bench_hit_rates.py measures on the second half):
  gating        layer T's router applied to an earlier layer's MoE input (the residual stream changes
                little between neighbouring layers): from layer T-1's input its top 4 recall 74% of
                T's experts, its top 8 90%; from T-2's, 64% and 84%
  co-activation the router statistics' P(expert of T | the experts T-1 chose): 49% alone; added to the
                gating log-probabilities at half weight it lifts the weakest layer (layer 1, predicted
                from layer 0's input: 40%) to 47%, the others by -2..+2 points, and the hit rate of an
                idealised cache (instant reads) by 4-5 points
Layer 0 has no earlier layer to guess from: its experts hit only when still resident.

`LookaheadPrefetcher` is a routing observer (qwen3next.moe.set_routing_observer). For a decode step
(one token) it issues, at `before_routing(L)`, the gating guess for L+1 (and, with horizons=(1, 2), for
L+2: on the demo that halved the reads landing late but read 15-20% more for the same hit rate, so it
is off by default), and at `routed(L)` the L+1 guess rescored with co-activation from L's choice. How
many candidates each signal reads adapts to its measured precision: per signal and target layer it
keeps the hit rate of each rank (a candidate at rank r counts as a hit when the target layer chooses
it, read or not, so ranks never read are measured too) and reads the leading ranks whose hit rate is
at least `min_precision` (0.25; looking two layers ahead, 0.15 gained 1-3 points of hit rate for 30%
more reads, 0.4 lost 3-5).
Prefill chunks are left alone (they read all their experts at once anyway).

Each guess's reads spare the experts the other pending guesses name (ExpertCache.prefetch keep=): the
policies score an unused prefetched expert lowest (no uses yet), so otherwise one guess's reads evicted
the last guess's before its layer ran (idealised hit rate with stats at 25% resident: 58% without, 83% with).

What is prefetched changes only what is read early, never the output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from .expert_cache import ExpertCache
    from .router_stats import RouterStatistics

@dataclass
class SignalFigures:
    """One signal's guesses scored against what the target layer then chose (whether read or not)."""

    steps: int = 0  # target-layer steps it guessed for
    candidates: int = 0  # experts it named (the cache reads those not resident)
    correct: int = 0  # of those, chosen by the target layer
    chosen: int = 0  # experts the target layer chose in those steps
    rank_hits: list[int] = field(default_factory=list)  # per rank: steps in which its candidate was chosen

    @property
    def precision(self) -> float:
        return self.correct / self.candidates if self.candidates else 0.0

    @property
    def recall(self) -> float:
        return self.correct / self.chosen if self.chosen else 0.0

    def recall_at(self, n: int) -> float:
        """What reading its top n every step would have recalled (n fixed, not adapted)."""
        return sum(self.rank_hits[:n]) / self.chosen if self.chosen else 0.0


SIGNALS = ("gating from L-1", "gating from L-2", "gating from L-1 + co-activation")
_COACTIVATED = 2  # index of the co-activation signal in SIGNALS
_FLOOR = 1e-4  # probability given to an expert co-activation never saw (its log must stay finite)


class LookaheadPrefetcher:
    """Reads the experts layer L+1 (and L+2) will likely choose while layer L runs (see the module docstring).

    routers: the main layers' routers by layer id. statistics: router statistics for co-activation
    (their conditional probabilities are copied at construction: E x E floats a layer, 1 MiB per layer
    for 512 experts; None or nothing counted: gating only). min_precision: the hit rate a rank must
    have to be read. memory: predictions over which a rank's hit rate is averaged (exponential decay).
    """

    needs_hidden = True  # it applies the next layer's router to the hidden state

    def __init__(self, cache: "ExpertCache", routers: dict[int, nn.Module], top_k: int,
                 statistics: "RouterStatistics | None" = None, horizons: Sequence[int] = (1,),
                 min_precision: float = 0.25, coactivation_weight: float = 0.5, memory: int = 256):
        if not set(horizons) <= {1, 2}:
            raise ValueError(f"horizons {tuple(horizons)}: the signals look 1 or 2 layers ahead")
        self.cache, self.routers, self.top_k = cache, routers, top_k
        self.horizons, self.min_precision, self.weight = tuple(horizons), min_precision, coactivation_weight
        self.decay = 1.0 - 1.0 / memory
        self.ranks = min(cache.experts, 3 * top_k)  # how deep rankings are kept and measured
        self.coactivation = _log_conditional(statistics) if statistics is not None and self.weight else None
        layers = max(routers) + 1
        # per signal and target layer: decayed hits per rank over decayed predictions; at the start every
        # signal reads its top k (as if each of those ranks had been right once)
        self.hits = torch.zeros(len(SIGNALS), layers, self.ranks, dtype=torch.float64)
        self.hits[:, :, :top_k] = 1.0
        self.seen = torch.ones(len(SIGNALS), layers, dtype=torch.float64)
        self.figures = [SignalFigures(rank_hits=[0] * self.ranks) for _ in SIGNALS]
        self.union = SignalFigures()  # every signal's candidates for a layer together
        self._guesses: dict[int, list[tuple[int, list[int], int]]] = {}  # target -> (signal, ranking, read)
        self._next_gating: tuple[int, torch.Tensor] | None = None  # (L+1, its gating log-probabilities)

    # -- the observer ------------------------------------------------------------------------------

    def before_routing(self, layer: int, x: torch.Tensor) -> None:
        if x.shape[0] != 1:  # a prefill chunk: it reads its experts itself, and no guess is pending
            self._guesses.clear()
            self._next_gating = None
            return
        self._next_gating = None
        for horizon in self.horizons:
            target = layer + horizon
            if target not in self.routers:
                continue
            with torch.inference_mode():
                scores = torch.log_softmax(self.routers[target](x).float().flatten(), dim=0)
            if horizon == 1:
                self._next_gating = (target, scores)
            self._guess(horizon - 1, target, scores)

    def routed(self, layer: int, ids: torch.Tensor) -> None:
        if ids.shape[0] != 1:
            return
        chosen = ids.flatten().tolist()
        self._score(layer, chosen)
        following = self._next_gating
        if self.coactivation is not None and following is not None and following[0] == layer + 1:
            target, gating = following
            conditional = self.coactivation[layer][chosen].logsumexp(0)  # log of the summed P(b | a): k x their mean
            self._guess(_COACTIVATED, target, gating + self.weight * conditional)

    # -- internals ---------------------------------------------------------------------------------

    def _guess(self, signal: int, target: int, scores: torch.Tensor) -> None:
        """Rank the target layer's experts, read the leading ranks precise enough, remember them for scoring."""
        ranking = torch.topk(scores, self.ranks).indices.tolist()
        rates = (self.hits[signal, target] / self.seen[signal, target]).tolist()
        read = next((r for r, rate in enumerate(rates) if rate < self.min_precision), self.ranks)
        self._guesses.setdefault(target, []).append((signal, ranking, read))
        if read:
            keep = [(layer, e) for layer, guesses in self._guesses.items() for _, named, n in guesses
                    for e in named[:n]]
            self.cache.prefetch(target, ranking[:read], keep)

    def _score(self, layer: int, chosen: list[int]) -> None:
        """Measure the guesses made for `layer` against its choice: figures, and the per-rank hit rates."""
        guesses = self._guesses.pop(layer, [])
        wanted = set(chosen)
        named: set[int] = set()
        for signal, ranking, read in guesses:
            hit = torch.tensor([e in wanted for e in ranking], dtype=torch.float64)
            self.hits[signal, layer].mul_(self.decay).add_(hit)
            self.seen[signal, layer] = self.seen[signal, layer] * self.decay + 1.0
            figures = self.figures[signal]
            figures.steps += 1
            figures.candidates += read
            figures.correct += int(hit[:read].sum())
            figures.chosen += len(wanted)
            figures.rank_hits = [n + int(h) for n, h in zip(figures.rank_hits, hit.tolist())]
            named.update(ranking[:read])
        if guesses:
            self.union.steps += 1
            self.union.candidates += len(named)
            self.union.correct += len(named & wanted)
            self.union.chosen += len(wanted)


def _log_conditional(statistics: "RouterStatistics") -> torch.Tensor | None:
    """[main layers - 1, E, E] log P(expert b at L+1 | expert a at L) from the co-activation counts (each
    row sums to 1 over b: a token that chose a at L chose k experts at L+1), or None when nothing was counted."""
    pairs = statistics.coactivation.double()
    if pairs.numel() == 0 or not bool(pairs.any()):
        return None
    conditional = pairs / pairs.sum(-1, keepdim=True).clamp(min=1)
    return conditional.clamp(min=_FLOOR).log().float()
