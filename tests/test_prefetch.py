"""The lookahead prefetcher: what it reads adapts to measured precision, finished reads count as hits, and
the output is the same bits with it as without it."""

from __future__ import annotations

import pytest
import torch

from qwen3next.offload.prefetch import LookaheadPrefetcher


class FakeCache:
    """What the prefetcher touches on an ExpertCache, recording each prefetch and the resident experts it keeps."""

    def __init__(self, layers: int, experts: int):
        self.experts = experts
        self.slot_of = {layer: [-1] * experts for layer in range(layers)}
        self.calls: list[tuple[int, list[int], list]] = []  # (layer, experts, what to keep)

    def prefetch(self, layer: int, experts, keep=()) -> None:
        resident = sorted({(kept, e) for kept, e in keep if self.slot_of[kept][e] >= 0})
        self.calls.append((layer, list(experts), resident))


def ranked_router(experts: int):
    """A router whose logits rank expert 0 first, then 1, 2, ... whatever the input."""
    return lambda x: torch.arange(experts, 0, -1, dtype=torch.float32).expand(x.shape[0], experts)


def step(prefetcher: LookaheadPrefetcher, chosen: dict[int, list[int]]) -> None:
    """One decode step through layers 0, 1, ... as SparseMoE reports them."""
    for layer, ids in chosen.items():
        prefetcher.before_routing(layer, torch.zeros(1, 8))
        prefetcher.routed(layer, torch.tensor([ids]))


def test_the_ranks_read_are_those_whose_measured_hit_rate_reaches_min_precision():
    cache = FakeCache(layers=2, experts=16)
    prefetcher = LookaheadPrefetcher(cache, {0: ranked_router(16), 1: ranked_router(16)}, top_k=4, min_precision=0.3)
    step(prefetcher, {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]})
    assert cache.calls[0][:2] == (1, [0, 1, 2, 3])  # nothing measured yet: the top k
    for n in range(200):  # layer 1 alternates between ranks 0-3 and 2-5: ranks 0, 1, 4, 5 are right half the time
        step(prefetcher, {0: [0, 1, 2, 3], 1: [0, 1, 2, 3] if n % 2 else [2, 3, 4, 5]})
    assert cache.calls[-1][:2] == (1, [0, 1, 2, 3, 4, 5])
    gating = prefetcher.figures[0]
    assert gating.steps == 201 and gating.recall_at(6) == 1.0 and gating.recall_at(4) == pytest.approx(0.75, abs=0.01)
    calls = len(cache.calls)
    prefetcher.before_routing(0, torch.zeros(3, 8))  # a prefill chunk reads its own experts
    prefetcher.routed(0, torch.zeros(3, 4, dtype=torch.int64))
    assert len(cache.calls) == calls


def test_a_guess_never_evicts_what_another_pending_guess_names():
    cache = FakeCache(layers=3, experts=16)
    cache.slot_of[2][0] = 5  # layer 2's top guess is resident, in slot 5
    routers = {layer: ranked_router(16) for layer in range(3)}
    prefetcher = LookaheadPrefetcher(cache, routers, top_k=4, horizons=(1, 2))
    prefetcher.before_routing(0, torch.zeros(1, 8))  # guesses for layer 1, then layer 2
    prefetcher.routed(0, torch.tensor([[0, 1, 2, 3]]))
    prefetcher.before_routing(1, torch.zeros(1, 8))  # layer 2 again: its slot 5 is still named by the guess above
    assert [(layer, kept) for layer, _, kept in cache.calls] == [(1, []), (2, [(2, 0)]), (2, [(2, 0)])]


@pytest.fixture(scope="module")
def quantized(models, tmp_path_factory):
    """The small fixture model at 4 bits (16 experts top-4 in 8 layers, plus the MTP layer's)."""
    from qwen3next.quant.convert import quantize_checkpoint
    from qwen3next.quant.policy import Policy

    folder = tmp_path_factory.mktemp("prefetch") / "q4"
    quantize_checkpoint(models("small"), folder, Policy(4), progress=False)
    return folder


CONTEXT = 128  # tokens: a short context leaves most of a small budget to expert slots


def budgeted(folder, slots: int):
    """The folder loaded under a budget that leaves `slots` expert slots."""
    import qwen3next
    from checkpoints import budget_for_slots

    engine = qwen3next.load(folder, cpu_mem=budget_for_slots(folder, slots, max_context=CONTEXT),
                            max_context=CONTEXT, router_stats=False)
    assert engine.expert_store.cache.slot_count == slots
    return engine


def test_a_prefetched_expert_whose_read_finished_is_a_hit(quantized):
    engine = budgeted(quantized, 4)
    cache = engine.expert_store.cache
    expert = cache.slot_of[1].index(-1)  # not resident
    cache.prefetch(1, [expert])
    for read in cache.pending[cache.slot_of[1][expert]]:
        read.result()
    before = (cache.counters.hits, cache.counters.prefetch_hits)
    cache.acquire(1, [expert])
    cache.release(1, [expert])
    assert (cache.counters.hits, cache.counters.prefetch_hits) == (before[0] + 1, before[1] + 1)


def test_output_is_identical_with_and_without_the_prefetcher(quantized):
    import qwen3next
    from qwen3next.moe import set_routing_observer
    from qwen3next.offload.router_stats import RouterStatistics

    resident = qwen3next.load(quantized, max_context=CONTEXT, router_stats=False)
    config = resident.config
    statistics = RouterStatistics(config.num_hidden_layers + 1, config.num_experts, config.num_experts_per_tok,
                                  config.num_hidden_layers)  # in memory: counted from a text of its own
    set_routing_observer(resident.model, statistics)
    resident.logits(list(range(200, 300)))
    set_routing_observer(resident.model, None)
    ids = list(range(3, 60))
    request = qwen3next.Request(prompt="Hello there", max_new_tokens=10, temperature=0)
    expected_logits, expected_tokens = resident.logits(ids, chunk=1), resident.complete(request).tokens

    engine = budgeted(quantized, 8)
    assert torch.equal(engine.logits(ids, chunk=1), expected_logits)
    cache = engine.expert_store.cache
    routers = {layer: engine.model.model.layers[layer].mlp.gate for layer in range(config.num_hidden_layers)}
    prefetcher = LookaheadPrefetcher(cache, routers, config.num_experts_per_tok, statistics, horizons=(1, 2))
    set_routing_observer(engine.model, prefetcher)
    assert torch.equal(engine.logits(ids, chunk=1), expected_logits)
    assert engine.complete(request).tokens == expected_tokens
    assert cache.counters.prefetched > 0 and all(f.steps > 0 for f in prefetcher.figures)
