"""Chat-turn state reuse (Engine.keep_prefix_states): the same tokens as a fresh prefill, fewer tokens prefilled.

fp32, where a reused state and a fresh prefill agree to the bit; in bf16 they agree up to rounding,
as prefills with different --prefill-chunk sizes do.
"""

from __future__ import annotations

import pytest

import qwen3next
from qwen3next import Request
from qwen3next.prefix_cache import PrefixStates


@pytest.fixture(scope="module")
def engine():
    return qwen3next.load(dtype="float32", quiet=True)  # the demo model: replies that read as text


def conversation(engine, followups=("And then?", "Why?"), first="Tell me about Elizabeth."):
    """(reply ids, cached prompt tokens) per turn; each reply goes back into the history as text."""
    messages, out = [{"role": "user", "content": first}], []
    for followup in (*followups, None):
        result = engine.complete(Request(messages=messages, max_new_tokens=8, temperature=0))
        out.append((result.tokens, result.usage.cached_tokens))
        messages += [{"role": "assistant", "content": result.text}, {"role": "user", "content": followup}]
    return out


def replies(turns):
    return [ids for ids, _ in turns]


@pytest.fixture
def keeping(engine):
    """Turn reuse on (with the number of snapshots asked for), off again afterwards."""
    yield engine.keep_prefix_states
    engine.keep_prefix_states(0)


def test_reused_turns_give_the_tokens_of_a_fresh_prefill(engine, keeping):
    fresh = conversation(engine)
    keeping(4)
    reused = conversation(engine)
    assert replies(reused) == replies(fresh)
    assert [cached for _, cached in fresh] == [0, 0, 0]
    assert reused[0][1] == 0 and all(cached > 0 for _, cached in reused[1:])


def test_an_edited_turn_and_another_conversation_stay_correct(engine, keeping):
    original, edited = ("And then?", "Why?"), ("Where did she go?",)
    expected = [replies(conversation(engine, original)), replies(conversation(engine, edited)),
                replies(conversation(engine, (), "Who is Mr Darcy?"))]
    keeping(2)
    got = []
    for followups, first in [(original, None), (edited, None), ((), "Who is Mr Darcy?"), (original, None)]:
        turns = conversation(engine, followups, *([first] if first else []))
        got.append(turns)
    assert [replies(t) for t in got] == expected + expected[:1]
    assert got[1][1][1] > 0  # the edit goes on from the first reply's state, which the original left


def test_the_number_of_snapshots_is_bounded(engine, keeping):
    keeping(3)
    conversation(engine)
    assert len(engine.prefix_states) == 3


def test_logits_are_untouched_by_kept_states(engine, keeping):
    ids = engine.tokenizer.encode("It is a truth universally acknowledged")
    before = engine.logits(ids)
    keeping(4)
    conversation(engine, ("And then?",))
    assert engine.logits(ids).equal(before)


def test_a_snapshot_must_match_the_cache_it_is_taken_of(engine):
    states = PrefixStates(lambda: engine.model.make_cache(64), limit=2)
    cache, cached = states.start([1, 2, 3])
    assert cached == 0 and cache.position == 0
    with pytest.raises(ValueError, match="holds 0 positions"):
        states.keep([1, 2])
