"""Generation through the library API: sampling, stopping, streaming text, context limits."""

from __future__ import annotations

import json

import pytest
import torch

import qwen3next
from qwen3next.errors import ContextLengthError, RequestError, UsageError
from qwen3next.generate import StopStrings
from qwen3next.sampling import Sampler, SamplingParams


@pytest.fixture(scope="module")
def engine(models):
    return qwen3next.load(models("tiny"), dtype="float32")


def ids_of(tokens):
    return [t.token for t in tokens]


def test_greedy_follows_the_argmax_of_logits(engine):
    prompt = engine.tokenizer.encode("Once upon a time")
    generated = ids_of(engine.generate(prompt, max_new_tokens=6, temperature=0))
    logits = engine.logits(prompt + generated)
    assert generated == logits[len(prompt) - 1 : -1].argmax(-1).tolist()


def test_seed_makes_sampling_reproducible(engine):
    run = lambda seed: ids_of(engine.generate("Hello", max_new_tokens=16, temperature=1.5, seed=seed))  # noqa: E731
    assert run(1) == run(1)
    assert run(1) != run(2)


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=0.999)])
def test_filters_that_keep_one_token_equal_greedy(engine, filters):
    greedy = ids_of(engine.generate("Hello", max_new_tokens=8, temperature=0))
    assert ids_of(engine.generate("Hello", max_new_tokens=8, temperature=1.0, seed=0, **filters)) == greedy


def test_top_k_keeps_only_the_k_best():
    logits = torch.tensor([0.0, 5.0, 4.0, 1.0, 3.0])
    sampler = Sampler(SamplingParams(temperature=2.0, top_k=2), seed=0)
    assert {sampler(logits) for _ in range(200)} == {1, 2}


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).log_softmax(-1)  # probs ~ .64 .24 .09 .03
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.8), seed=0)
    assert {sampler(logits) for _ in range(300)} == {0, 1}


def test_filtered_distribution_equals_transformers_processors():
    """Penalty, temperature, top-k and top-p in transformers' order give transformers' distribution (top-p sorts
    only the candidates top-k left, with duplicate ids in the history)."""
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 500, generator=generator) * 3
    history = torch.tensor([[5, 17, 5, 250, 499, 17, 0]])
    for top_k, top_p in ((20, 0.8), (0, 0.9), (50, 1.0), (7, 0.3)):
        ours = Sampler(SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p, repetition_penalty=1.3))
        scores = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
        scores = TemperatureLogitsWarper(0.7)(history, scores)
        if top_k:
            scores = TopKLogitsWarper(top_k)(history, scores)
        if top_p < 1.0:
            scores = TopPLogitsWarper(top_p)(history, scores)
        expected = torch.softmax(scores[0], -1)
        assert torch.allclose(ours.probabilities(logits[0], history[0]), expected, atol=1e-6)


def test_draws_follow_the_distribution_and_never_pick_a_masked_id():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    sampler = Sampler(SamplingParams(), seed=0)
    counts = torch.bincount(torch.tensor([sampler.sample(probs) for _ in range(20000)]), minlength=6)
    assert counts[[0, 2, 5]].sum() == 0
    assert torch.allclose(counts.float() / 20000, probs, atol=0.015)
    assert {sampler.sample(probs * 7) for _ in range(200)} <= {1, 3, 4}  # unnormalised weights work too


def test_a_draw_at_the_very_top_still_picks_an_id_with_mass_and_no_mass_is_an_error(monkeypatch):
    sampler = Sampler(SamplingParams(), seed=0)
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(1.0, dtype=torch.float64))  # u == the total
    assert sampler.sample(torch.tensor([0.0, 0.3, 0.7, 0.0, 0.0])) == 2
    monkeypatch.undo()
    for no_mass in (torch.zeros(4), torch.tensor([float("nan"), 1.0])):
        with pytest.raises(ValueError, match="no probability mass"):
            sampler.sample(no_mass)


def test_repetition_penalty_follows_transformers_semantics():
    logits = torch.tensor([2.0, -2.0, 1.9, -1.0])
    penalized = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0))
    assert penalized(logits, torch.tensor([0])) == 2  # 2.0 / 2 = 1.0 < 1.9
    assert penalized(torch.tensor([-1.0, -3.0]), torch.tensor([0])) == 0  # -1 * 2 = -2 > -3


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2), dict(min_p=1.0),
                                 dict(repetition_penalty=0)])
def test_bad_sampling_values_name_the_field(engine, bad):
    with pytest.raises(RequestError) as caught:
        engine.generate("Hello", **bad)
    assert caught.value.field == next(iter(bad)) and str(caught.value).startswith(next(iter(bad)) + " ")


def test_defaults_come_from_generation_config(engine):
    assert engine.sampling_defaults == SamplingParams(temperature=0.7, top_k=20, top_p=0.8)


@pytest.mark.parametrize("which", [0, 1])
def test_every_eos_id_stops_generation(models, tmp_path, which):
    """Whichever id of generation_config's eos list comes up, generation ends there."""
    engine = qwen3next.load(models("tiny"), dtype="float32")
    greedy = ids_of(engine.generate("Hello", max_new_tokens=8, temperature=0))
    target = greedy[3]
    engine.eos_ids = [target, 10**6] if which == 0 else [10**6, target]
    result = engine.complete(qwen3next.Request(prompt="Hello", max_new_tokens=8, temperature=0))
    assert result.tokens == greedy[: greedy.index(target) + 1]
    assert result.finish_reason == "stop"


def test_eos_list_is_read_from_generation_config(engine, models):
    generation = json.loads((models("tiny") / "generation_config.json").read_text())
    assert engine.eos_ids == generation["eos_token_id"] and len(engine.eos_ids) == 2


def test_streamed_text_equals_decoding_all_tokens(engine):
    tokens = list(engine.generate("Café ☕ 東京", max_new_tokens=40, temperature=1.0, seed=3))
    assert "".join(t.text for t in tokens) == engine.tokenizer.decode(ids_of(tokens), skip_special_tokens=True)


def test_stop_string_ends_generation_and_is_not_emitted(engine):
    full = "".join(t.text for t in engine.generate("Hello", max_new_tokens=30, temperature=0))
    stop = full[5:8]
    assert stop and stop in full
    result = engine.complete(qwen3next.Request(prompt="Hello", max_new_tokens=30, temperature=0, stop=[stop]))
    assert result.text == full[: full.index(stop)]
    assert result.finish_reason == "stop"


def test_stop_strings_hold_back_possible_prefixes():
    stops = StopStrings(["</end>"])
    assert stops.feed("abc</e") == ("abc", False)
    assert stops.feed("x") == ("</ex", False)
    assert stops.feed("</en") == ("", False)
    assert stops.feed("d>tail") == ("", True)


def test_max_new_tokens_and_zero(engine):
    result = engine.complete(qwen3next.Request(prompt="Hello", max_new_tokens=5, temperature=0))
    assert len(result.tokens) == 5 and result.finish_reason == "length"
    assert list(engine.generate("Hello", max_new_tokens=0)) == []


def test_negative_max_new_tokens(engine):
    with pytest.raises(RequestError, match="^max_new_tokens -1: must be >= 0"):
        engine.generate("Hello", max_new_tokens=-1)


def test_empty_prompt(engine):
    for empty in ("", "   ", []):
        with pytest.raises(UsageError, match="empty"):
            engine.generate(empty)


def test_context_length(models):
    engine = qwen3next.load(models("short_context"), dtype="float32")
    with pytest.raises(ContextLengthError, match="context"):
        engine.generate(list(range(48)))
    result = engine.complete(qwen3next.Request(prompt=list(range(40)), max_new_tokens=100, temperature=0))
    assert len(result.tokens) == 8 and result.finish_reason == "length"  # stops at the context's end


def test_chat_template_prompt(engine):
    ids = engine.prompt_ids(qwen3next.Request(prompt="Hi", system="Be brief."))
    text = engine.tokenizer.decode(ids)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_long_prompt_prefills_in_chunks_with_same_result(engine):
    prompt = engine.tokenizer.encode("the cat sat on the mat. " * 60)
    assert len(prompt) > 300
    one = ids_of(engine.generate(prompt, max_new_tokens=8, temperature=0, prefill_chunk=4096))
    chunked = ids_of(engine.generate(prompt, max_new_tokens=8, temperature=0, prefill_chunk=50))
    assert one == chunked


def test_the_result_carries_usage_and_timings_of_its_own_call(engine):
    result = engine.complete(qwen3next.Request(prompt="Hello there", max_new_tokens=4, temperature=0))
    other = engine.complete(qwen3next.Request(prompt="Hi", max_new_tokens=2, temperature=0))
    assert result.usage.prompt_tokens == len(engine.tokenizer.encode("Hello there"))
    assert result.usage.completion_tokens == 4 and len(result.tokens) == 4 and result.usage.total_tokens > 4
    assert result.timings.prefill_tokens_per_second(result.usage.prompt_tokens) > 0
    assert result.timings.decode_steps == 3 and result.timings.decode_tokens_per_second > 0
    assert other.usage.completion_tokens == 2  # a later call does not touch an earlier result


def test_a_single_stop_string_is_not_split_into_characters(engine):
    full = "".join(t.text for t in engine.generate("Hello", max_new_tokens=30, temperature=0))
    stop = full[5:8]
    text = "".join(t.text for t in engine.generate("Hello", max_new_tokens=30, temperature=0, stop=stop))
    assert text == full[: full.index(stop)]


@pytest.mark.parametrize("bad", [dict(max_new_tokens="3"), dict(max_new_tokens=2.5), dict(temperature="hot"),
                                 dict(top_k=True), dict(seed=1.5), dict(stop=[1]), dict(prompt=5),
                                 dict(prompt=[True, 2]), dict(prompt=[1, 2], chat=True)])
def test_wrong_types_are_usage_errors(engine, bad):
    prompt = bad.pop("prompt", "Hello")
    with pytest.raises(UsageError):
        engine.generate(prompt, **bad)


def test_system_message_goes_first_in_a_message_list(engine):
    ids = engine.prompt_ids(qwen3next.Request(messages=[{"role": "user", "content": "Hi"}], system="Be brief."))
    assert engine.tokenizer.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_logits_refuses_an_empty_chunk(engine):
    with pytest.raises(UsageError, match="chunk"):
        engine.logits([1, 2, 3], chunk=0)
