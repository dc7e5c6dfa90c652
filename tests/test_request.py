"""The request API: one validated Request for every caller, a stream that ends with its own Result."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import qwen3next
from qwen3next.errors import RequestError
from qwen3next.request import _FIELDS, Request, Result, Token
from qwen3next.sampling import Sampler, SamplingParams


def test_every_field_has_a_check():
    assert set(_FIELDS) == {f.name for f in dataclasses.fields(Request)}


@pytest.mark.parametrize("fields, field", [
    (dict(prompt="x", temperature=-1), "temperature"),
    (dict(prompt="x", top_p=0.0), "top_p"),
    (dict(prompt="x", top_k=2.5), "top_k"),
    (dict(prompt="x", seed="7"), "seed"),
    (dict(prompt="x", temperature=float("nan")), "temperature"),
    (dict(prompt="x", max_new_tokens=True), "max_new_tokens"),
    (dict(prompt="x", stop=[1]), "stop"),
    (dict(prompt="x", chat="yes"), "chat"),
    (dict(prompt="x", prefill_chunk=0), "prefill_chunk"),
    (dict(prompt=5), "prompt"),
    (dict(prompt=[1, -2]), "prompt"),
    (dict(prompt=" "), "prompt"),
    (dict(), "prompt"),
    (dict(prompt="x", messages=[{"role": "user", "content": "y"}]), "prompt"),
    (dict(prompt=[1, 2], chat=True), "chat"),
    (dict(messages=[]), "messages"),
    (dict(messages=["hi"]), "messages[0]"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    (dict(messages=[{"role": "user", "content": 3}]), "messages[0].content"),
    (dict(messages=[{"role": "user"}]), "messages[0].content"),
    (dict(messages=[{"role": "user", "content": "x"}], tools={"name": "f"}), "tools"),
    (dict(messages=[{"role": "user", "content": "x"}], tools=[{"type": "function"}]), "tools[0]"),
    (dict(prompt="x", tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
])
def test_bad_fields_are_named(fields, field):
    with pytest.raises(RequestError) as caught:
        Request(**fields)
    assert caught.value.field == field and str(caught.value).startswith(field + " ")


def test_from_dict_names_unknown_fields_and_takes_defaults():
    with pytest.raises(RequestError, match="^bogus 1: unknown field"):
        Request.from_dict({"prompt": "x", "bogus": 1})
    with pytest.raises(RequestError, match="JSON object"):
        Request.from_dict(["x"])
    request = Request.from_dict({"prompt": "x", "top_k": None, "stop": "END"}, defaults={"top_k": 3, "seed": 1})
    assert (request.top_k, request.seed, request.stop) == (3, 1, ("END",))
    assert Request.from_dict(request.as_dict()) == request


@pytest.fixture(scope="module")
def engine(models):
    return qwen3next.load(models("tiny"), dtype="float32")


def test_stream_yields_tokens_then_one_result(engine):
    events = list(engine.stream(Request(prompt="Hello", max_new_tokens=5, temperature=0)))
    assert all(isinstance(e, Token) for e in events[:-1]) and isinstance(events[-1], Result)
    result = events[-1]
    assert result.tokens == [e.token for e in events[:-1]] and result.text == "".join(e.text for e in events[:-1])
    assert result.finish_reason == "length" and result.usage.completion_tokens == 5


def test_a_closed_stream_stops_generating(engine):
    stream = engine.stream(Request(prompt="Hello", max_new_tokens=50, temperature=0))
    next(stream)
    stream.close()
    with pytest.raises(StopIteration):
        next(stream)


def test_bad_requests_raise_before_iteration(engine):
    with pytest.raises(RequestError, match="vocabulary"):
        engine.stream(Request(prompt=[10**7]))
    with pytest.raises(qwen3next.Qwen3NextError, match="Request"):
        engine.stream({"prompt": "x"})


def test_tools_reach_the_chat_template(engine):
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    with_tools = engine.prompt_ids(Request(messages=[{"role": "user", "content": "Hi"}], tools=[tool]))
    without = engine.prompt_ids(Request(messages=[{"role": "user", "content": "Hi"}]))
    assert "get_weather" in engine.tokenizer.decode(with_tools) and "get_weather" not in engine.tokenizer.decode(without)


def test_sampler_probabilities_are_the_filtered_distribution():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    top2 = Sampler(SamplingParams(temperature=1.0, top_k=2)).probabilities(logits)
    assert torch.allclose(top2, torch.tensor([0.7311, 0.2689, 0, 0, 0]), atol=1e-4)
    min_p = Sampler(SamplingParams(temperature=1.0, min_p=0.1)).probabilities(logits)
    assert (min_p > 0).sum() == 3 and torch.isclose(min_p.sum(), torch.tensor(1.0))
    greedy = Sampler(SamplingParams(temperature=0.0, repetition_penalty=4.0)).probabilities(logits, torch.tensor([0]))
    assert greedy.tolist() == [0, 1, 0, 0, 0]  # 3 / 4 < 2: the penalty moved the argmax


def test_sampled_tokens_follow_the_exposed_probabilities():
    logits = torch.tensor([1.0, 0.5, 0.0, -3.0])
    sampler = Sampler(SamplingParams(temperature=0.8, top_p=0.9), seed=0)
    draws = torch.tensor([sampler(logits) for _ in range(4000)])
    frequencies = torch.bincount(draws, minlength=4).float() / len(draws)
    assert (frequencies - sampler.probabilities(logits)).abs().max() < 0.03  # ~4 standard errors at n=4000
