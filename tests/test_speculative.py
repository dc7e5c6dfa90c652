"""Speculative decoding with the MTP head: greedy output token for token as without it, and the cache rewound.

Random checkpoints' MTP heads draft almost nothing the main model accepts, so besides the real head
an oracle drafter proposes the plain run's own continuation with some tokens corrupted: that makes
long accepted runs, rejections at every draft position, and finishes inside an accepted run.
"""

from __future__ import annotations

import re

import pytest
import torch

import qwen3next
from qwen3next import speculative
from qwen3next.errors import RequestError
from qwen3next.generate import generate_ids
from qwen3next.request import Request, Timings
from qwen3next.sampling import Sampler, SamplingParams

from test_cli import cli  # noqa: F401  (the fixture)

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def engine(models, request):
    return qwen3next.load(models("tiny"), dtype=request.param, quiet=True)


def plain(engine, prompt, n, eos=(), **kw):
    return [t for t, _ in generate_ids(engine.model, prompt, Sampler(GREEDY), n, eos, engine.context_length,
                                       Timings(), **kw)]


def spec(engine, prompt, n, drafts, eos=(), **kw):
    return [t for t, _ in generate_ids(engine.model, prompt, Sampler(GREEDY), n, eos, engine.context_length,
                                          Timings(), draft_tokens=drafts, **kw)]


@pytest.fixture
def oracle(monkeypatch):
    """Drafts that follow `reference` (prompt + the plain continuation), every third call one token off;
    counts calls and the drafts the main model would accept."""
    state = {"reference": None, "calls": 0}

    def draft(self, hidden, next_tokens, start, n, rule, history):
        state["calls"] += 1
        first = start + len(next_tokens) + 1
        out = list(state["reference"][first : first + n])
        out += [0] * (n - len(out))
        if state["calls"] % 3 == 0:
            wrong = state["calls"] % n
            out[wrong] = (out[wrong] + 1) % self.model.config.vocab_size
        return out

    monkeypatch.setattr(speculative.Drafter, "draft", draft)
    return state


@pytest.mark.parametrize("drafts", [1, 3])
def test_mtp_drafts_give_the_plain_greedy_tokens(engine, drafts):
    for prompt in ([5, 17, 99, 3], list(range(40, 70))):
        assert spec(engine, prompt, 12, drafts) == plain(engine, prompt, 12)


@pytest.mark.slow
@pytest.mark.parametrize("drafts", [1, 3, 5])
def test_oracle_runs_finish_anywhere_inside_an_accepted_run(engine, oracle, drafts):
    prompt = [7, 8, 9, 10, 11]
    expected = plain(engine, prompt, 24)
    oracle["reference"] = prompt + expected
    for n in range(1, 2 * drafts + 3):  # max_new_tokens lands at every offset of the runs
        assert spec(engine, prompt, n, drafts) == expected[:n]
    calls = oracle["calls"]
    assert spec(engine, prompt, 24, drafts) == expected
    assert oracle["calls"] - calls < 24 * 0.75  # runs were accepted: fewer verify passes than tokens
    for eos in expected[3:9]:  # an eos id inside an accepted run ends there
        cut = expected.index(eos) + 1
        assert spec(engine, prompt, 24, drafts, eos=[eos]) == plain(engine, prompt, 24, eos=[eos]) == expected[:cut]


def test_chunked_prefill_with_the_real_head(engine):
    prompt = list(range(100, 137))
    assert spec(engine, prompt, 12, 2, prefill_chunk=5) == plain(engine, prompt, 12, prefill_chunk=5)


@pytest.mark.slow
def test_chunked_prefill_with_accepted_runs(engine, oracle):
    prompt = list(range(100, 137))
    expected = plain(engine, prompt, 12, prefill_chunk=5)  # (chunking itself may move bf16 bits)
    oracle["reference"] = prompt + expected
    assert spec(engine, prompt, 12, 3, prefill_chunk=5) == expected


def test_repetition_penalty_sees_the_accepted_drafts(engine, oracle):
    """Each verified position's choice is penalised with the tokens accepted before it in the same step.
    (A penalty below 1 favours seen tokens: on a random model that is what makes the history matter.)"""
    sampler = lambda: Sampler(SamplingParams(temperature=0.0, repetition_penalty=0.5))  # noqa: E731
    prompt = [4, 4, 4, 9, 9]
    expected = [t for t, _ in generate_ids(engine.model, prompt, sampler(), 16, (), engine.context_length, Timings())]
    assert expected != plain(engine, prompt, 16)  # the penalty changes the output
    oracle["reference"] = prompt + expected
    got = [t for t, _ in generate_ids(engine.model, prompt, sampler(), 16, (), engine.context_length, Timings(),
                                         draft_tokens=4)]
    assert got == expected
    assert spec(engine, prompt, 0, 2) == []


@pytest.mark.slow
@pytest.mark.parametrize("drafts", [1, 3])
def test_the_cache_holds_the_prompt_and_earlier_tokens_when_a_token_is_yielded(engine, oracle, drafts):
    """Stop inside an accepted run: the cache must be exactly prompt + tokens[:-1], DeltaNet states included,
    so plain decoding resumed from it gives the plain continuation."""
    prompt = [3, 1, 4, 1, 5, 9]
    expected = plain(engine, prompt, 20)
    oracle["reference"] = prompt + expected
    for stop_at in (2, 5, 6, 9):
        cache = engine.model.make_cache(engine.context_length)
        tokens = generate_ids(engine.model, prompt, Sampler(GREEDY), 20, (), engine.context_length, Timings(),
                                 cache=cache, draft_tokens=drafts)
        got = [next(tokens)[0] for _ in range(stop_at)]
        tokens.close()
        assert got == expected[:stop_at]
        assert cache.position == len(prompt) + stop_at - 1
        resumed = plain(engine, prompt + got, 20 - stop_at, cache=cache, cached=cache.position)
        assert got + resumed == expected


@pytest.mark.slow
def test_end_of_the_context_clips_the_drafts(models, oracle):
    engine = qwen3next.load(models("short_context"), dtype="float32", quiet=True)
    prompt = list(range(1, 40))  # 48 positions: 9 left
    expected = plain(engine, prompt, 30)
    assert len(expected) == 9
    oracle["reference"] = prompt + expected
    assert spec(engine, prompt, 30, 6) == expected


@pytest.mark.slow
def test_stop_strings_and_the_request_field(models):
    engine = qwen3next.load(models("tiny"), dtype="float32", quiet=True)
    base = engine.complete(Request(prompt="Once upon a time", max_new_tokens=24, temperature=0))
    stop = base.text[len(base.text) // 2 :][:3]
    for n in (0, 1, 3):
        result = engine.complete(Request(prompt="Once upon a time", max_new_tokens=24, temperature=0, speculative=n))
        assert result.tokens == base.tokens
        stopped = engine.complete(Request(prompt="Once upon a time", max_new_tokens=24, temperature=0, speculative=n,
                                          stop=[stop]))
        assert stopped.finish_reason == "stop" and stopped.text == base.text[: base.text.index(stop)]


@pytest.mark.slow
def test_demo_model_greedy_is_unchanged_and_drafts_are_accepted():
    engine = qwen3next.load(quiet=True)
    ask = lambda n: engine.complete(Request(prompt="The river flows through the old town, and",  # noqa: E731
                                            max_new_tokens=40, temperature=0, speculative=n))
    expected = ask(0).tokens
    for drafts in (1, 2):
        result = ask(drafts)
        timings = result.timings
        assert result.tokens == expected
        assert timings.drafted <= drafts * timings.verify_steps
        assert 0 < timings.accepted <= timings.drafted  # the demo head's drafts are often right
        assert timings.decode_steps == len(expected) - 1 <= timings.verify_steps + timings.accepted
        assert timings.verify_steps < 35


@pytest.mark.parametrize("value", [-1, 1.5, "2", True])
def test_bad_values_name_the_field(value):
    with pytest.raises(RequestError) as info:
        Request(prompt="x", speculative=value)
    assert info.value.field == "speculative"


def test_no_mtp_head_is_a_request_error(models):
    tied = qwen3next.load(models("tied"), dtype="float32", quiet=True)
    assert tied.model.mtp is None
    assert tied.complete(Request(prompt="hi", max_new_tokens=3, temperature=0, speculative=0)).tokens
    with pytest.raises(RequestError, match="MTP head") as info:
        tied.complete(Request(prompt="hi", max_new_tokens=3, temperature=0, speculative=2))
    assert info.value.field == "speculative"


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a / a.sum() - b / b.sum()).abs().sum())


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=5),
                                    SamplingParams(temperature=1.2, top_p=0.7, min_p=0.05)])
def test_the_sampling_rule_gives_the_target_distribution(params):
    """Drafts from q, judged against p: the first token is distributed as p (the filters applied), for a q far
    from p. 40,000 trials: the empirical distribution's total variation from p is ~0.01; accepting every draft
    (0.27 from p here) or never resampling from the residual would be far off."""
    vocab, trials = 12, 40_000
    generator = torch.Generator().manual_seed(0)
    target_logits = torch.randn(vocab, generator=generator) * 2
    draft_logits = torch.randn(vocab, generator=generator) * 2
    sampler = Sampler(params, seed=1)
    rule = speculative.SamplingRule(sampler)
    p, q = sampler.probabilities(target_logits), sampler.probabilities(draft_logits)
    counts, accepted = torch.zeros(vocab), 0
    for _ in range(trials):
        draft = rule.propose(draft_logits, None)
        run = rule.accept(torch.stack((target_logits, target_logits)), [draft], [], False)
        counts[run[0]] += 1
        accepted += len(run) == 2
    assert total_variation(counts, p) < 0.02
    assert total_variation(q, p) > 0.1  # the test could fail: the draft distribution is not the target
    assert abs(accepted / trials - float(torch.minimum(p, q).sum())) < 0.02  # acceptance = sum min(p, q)
    assert torch.equal(counts[p == 0], torch.zeros_like(counts[p == 0]))  # filtered-out tokens never appear


def sequence_probabilities(engine, prompt: list[int], params: SamplingParams, length: int) -> dict:
    """Every continuation of `length` tokens the sampler can draw, with its exact probability (product of
    Sampler.probabilities along it, from plain forwards of the model)."""
    sampler, out = Sampler(params), {(): 1.0}
    for _ in range(length):
        grown = {}
        for sequence, probability in out.items():
            with torch.inference_mode():
                logits = engine.model(torch.tensor([prompt + list(sequence)]), last_only=True)[0, -1]
            p = sampler.probabilities(logits)
            for token in p.nonzero().flatten().tolist():
                grown[sequence + (token,)] = probability * float(p[token])
        out = grown
    return out


@pytest.mark.slow
def test_sampled_speculation_draws_from_the_plain_distribution(models):
    """End to end on a tiny model with a weak head (many rejections): 800 seeded runs of 3 tokens drawn with
    drafting follow the exact distribution of plain sampling over the 8 continuations top_k 2 allows (total
    variation ~0.04 expected from noise; drafts kept regardless would follow the head's guesses instead), and
    one seed with one draft setting gives the same tokens twice."""
    engine = qwen3next.load(models("tiny"), dtype="float32", quiet=True)
    params, prompt, runs = SamplingParams(temperature=1.0, top_k=2), [5, 17, 99, 3], 800
    exact = sequence_probabilities(engine, prompt, params, 3)
    counts, timings = dict.fromkeys(exact, 0), Timings()
    for seed in range(runs):
        tokens = tuple(t for t, _ in generate_ids(engine.model, prompt, Sampler(params, seed), 3, (),
                                                     engine.context_length, timings, draft_tokens=2))
        counts[tokens] += 1  # a continuation outside the 8 would be a KeyError
    distance = 0.5 * sum(abs(counts[s] / runs - exact[s]) for s in exact)
    assert distance < 0.1 and timings.drafted > 0
    again = [[t for t, _ in generate_ids(engine.model, prompt, Sampler(params, 7), 12, (), engine.context_length,
                                            Timings(), draft_tokens=2)] for _ in range(2)]
    assert again[0] == again[1]


@pytest.mark.slow
def test_cli_flag(cli, models):  # noqa: F811
    code, out, err = cli(["run", "-m", str(models("tied")), "-p", "hi", "-n", "3", "-q", "--speculative", "2"])
    assert code != 0 and "--speculative 2" in err and "MTP head" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli(["run", "-m", str(models("tiny")), "-p", "hi", "-n", "3", "-q", "--speculative", "-1"])
    assert code != 0 and "--speculative -1" in err and len(err.strip().splitlines()) == 1
    outputs = [cli(["run", "-m", str(models("tiny")), "-p", "hi", "-n", "6", "-t", "0", "-q", "--speculative", n])[1]
               for n in ("0", "2")]
    assert outputs[0] == outputs[1]
    code, out, err = cli(["run", "-m", str(models("tiny")), "-p", "hi", "-n", "6", "-t", "0", "-q", "--stats",
                          "--speculative", "2"])
    line = next(x for x in err.splitlines() if x.startswith("speculative: "))
    drafted, accepted = (int(x) for x in re.findall(r"(\d+) (?:drafted|accepted)", line))
    assert code == 0 and 0 < drafted <= 2 * 5 and 0 <= accepted <= drafted and "tokens per verify step" in line
    assert re.search(r"by draft position \d+% \d+%\)", line)


def test_acceptance_is_counted_per_draft_position():
    timings = Timings()
    for drafted, accepted in ((3, 1), (3, 3), (2, 0), (1, 1)):
        timings.count_verify(drafted, accepted)
    assert (timings.verify_steps, timings.drafted, timings.accepted) == (4, 9, 5)
    assert timings.drafted_by_position == [4, 3, 2] and timings.accepted_by_position == [3, 1, 1]


@pytest.fixture(scope="module")
def variants(models, tmp_path_factory):
    """load() arguments by name: the tiny model resident, quantized, and with experts read from disk (4 slots)."""
    from checkpoints import budget_for_slots
    from qwen3next.quant.convert import quantize_checkpoint
    from qwen3next.quant.policy import Policy

    root = tmp_path_factory.mktemp("verify")
    folders = {"bf16": models("tiny")}
    for bits in (4, 8):
        folders[f"q{bits}"] = root / f"q{bits}"
        quantize_checkpoint(models("tiny"), folders[f"q{bits}"], Policy(bits), progress=False)

    def arguments(name: str) -> dict:
        folder = folders[name.split()[0]]
        args = dict(dtype="bfloat16", router_stats=False, quiet=True)
        if name.endswith("offloaded"):
            args.update(cpu_mem=budget_for_slots(folder, 4, dtype="bfloat16", max_context=256), max_context=256)
        return folder, args

    return arguments


def one_steps_equal_a_verify_pass(engine, prompt, ids):
    a, b = engine.model.make_cache(64), engine.model.make_cache(64)
    with torch.inference_mode():
        engine.model(prompt, a)
        engine.model(prompt, b)
        hidden, logits, states = engine.model.decode_steps(ids, a)
        for t in range(ids.shape[1]):
            one = engine.model.hidden_states(ids[:, t : t + 1], b)
            assert torch.equal(one[0, 0], hidden[0, t])
            assert torch.equal(engine.model.logits_from_hidden(one)[0, 0], logits[0, t])
            for layer, kept in zip(b.layers, states[t]):
                if kept is not None:
                    assert torch.equal(layer.recurrent, kept.recurrent) and torch.equal(layer.conv, kept.conv)
                else:
                    assert layer.length == len(prompt[0]) + t + 1


def test_verify_pass_keeps_states_per_position(engine):
    """decode_steps equals T one-token steps, state by state (fp32: position by position; bf16: one pass)."""
    one_steps_equal_a_verify_pass(engine, torch.tensor([[2, 7, 1, 8]]), torch.tensor([[28, 18, 28]]))


@pytest.mark.parametrize("variant", ["bf16", "q4", "q8", "q4 offloaded", "bf16 offloaded"])
def test_one_verify_pass_over_all_positions_has_the_bits_of_single_steps(variants, variant):
    """With the CPU kernels the positions share every call (each kernel computes a row alone): resident, quantized
    and with experts read from disk into 4 slots; without them (the torch fallback) positions run one by one."""
    from qwen3next import cpu_kernels

    folder, args = variants(variant)
    with qwen3next.load(folder, **args) as engine:
        ids = torch.tensor([[28, 18, 28, 45, 9]])
        with torch.inference_mode():
            shared = engine.model.rows_stand_alone(engine.model.model.embed_tokens(ids))
        assert shared == (cpu_kernels.library() is not None)
        one_steps_equal_a_verify_pass(engine, torch.tensor([[2, 7, 1, 8, 3, 3]]), ids)
        prompt = list(range(40, 60))
        expected = plain(engine, prompt, 10)
        assert spec(engine, prompt, 10, 3) == expected


@pytest.mark.slow
def test_kept_chat_turns_with_speculation_give_the_plain_replies():
    """The server's turn reuse snapshots the cache while tokens are yielded: with drafting on, every turn's
    reply must still be the plain one (fp32 demo model: a kept state equals a fresh prefill to the bit)."""
    engine = qwen3next.load(dtype="float32", quiet=True)

    def conversation(speculative):
        messages, out = [{"role": "user", "content": "Tell me about Elizabeth."}], []
        for followup in ("And then?", "Why?", None):
            result = engine.complete(Request(messages=messages, max_new_tokens=10, temperature=0,
                                             speculative=speculative, stop=["."]))
            out.append((result.tokens, result.usage.cached_tokens))
            messages += [{"role": "assistant", "content": result.text}, {"role": "user", "content": followup}]
        return out

    plain_turns = conversation(0)
    engine.keep_prefix_states(4)
    kept = conversation(2)
    assert [ids for ids, _ in kept] == [ids for ids, _ in plain_turns]
    assert all(cached > 0 for _, cached in kept[1:])


def test_a_verify_pass_reads_each_expert_of_a_layer_once(variants):
    """Experts from disk (12 slots, more than a layer's 8 experts): the positions of one pass share each read
    (a later position's experts that an earlier one fetched are hits), so its misses are at most the distinct
    (layer, expert) pairs it routed to, while the rows chose many more."""
    from qwen3next.moe import set_routing_observer
    from checkpoints import budget_for_slots

    folder, args = variants("q4")
    args.update(cpu_mem=budget_for_slots(folder, 12, dtype="bfloat16", max_context=256), max_context=256, prefetch=False)
    with qwen3next.load(folder, **args) as engine:
        cache = engine.expert_store.cache
        assert cache.slot_count == 12 and not cache.complete
        chosen = []

        class Recorder:
            def before_routing(self, layer, x):
                pass

            def routed(self, layer, ids):
                chosen.extend((layer, e) for e in ids.flatten().tolist())

        model_cache = engine.model.make_cache(64)
        with torch.inference_mode():
            engine.model(torch.tensor([[2, 7, 1, 8]]), model_cache)
            set_routing_observer(engine.model, Recorder())
            misses = cache.counters.misses
            engine.model.decode_steps(torch.tensor([[28, 18, 28, 45, 9]]), model_cache)
            misses = cache.counters.misses - misses
        assert 0 < misses <= len(set(chosen)) < len(chosen)
