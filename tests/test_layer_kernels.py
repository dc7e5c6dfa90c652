"""The one-call layer kernels (csrc/layer_kernels.c) against the module path they replace at decode.

A decode step (and a verify pass of a few positions) runs each decoder layer's norm, mixer and residual as
one C call; the module path computes the same thing op by op. They must agree: the same greedy tokens and
logits, bf16 and 8/4-bit matrices alike, across the KV buffer growing, and the kernels must follow weights
that move.
"""

from __future__ import annotations

import pytest
import torch

import qwen3next
from qwen3next import cpu_kernels
from qwen3next.model import DecoderLayer


@pytest.fixture(autouse=True, scope="module")
def kernels():
    status = cpu_kernels.prepare()
    if status.isa is None:
        pytest.skip(f"kernels not loaded: {status.describe()}")


@pytest.fixture(scope="module")
def folders(models, tmp_path_factory):
    from qwen3next.quant.convert import quantize_checkpoint
    from qwen3next.quant.policy import Policy

    root = tmp_path_factory.mktemp("layer-kernels")
    out = {"bf16": models("tiny")}
    for bits in (4, 8):
        out[f"q{bits}"] = root / f"q{bits}"
        quantize_checkpoint(models("tiny"), out[f"q{bits}"], Policy(bits, bits_for=[("*_attn.*", bits)]), progress=False)
    return out


def without_layer_kernels(monkeypatch):
    """The module path: no layer kernels, and no whole step (which would reuse kernels already built)."""
    from qwen3next import whole_step

    monkeypatch.setattr(DecoderLayer, "_mixer_step", lambda self, x, cache, as_steps: None)
    monkeypatch.setattr(whole_step, "run_layers", lambda *a, **k: False)


def greedy_steps(model, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Prefill (module path: many rows), then one-token steps; the tokens and every step's logits."""
    cache = model.make_cache()
    tokens, logits = [], []
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), cache, last_only=True)
        for _ in range(steps):
            logits.append(out[0, -1])
            tokens.append(int(out[0, -1].argmax()))
            out = model(torch.tensor([[tokens[-1]]]), cache, last_only=True)
    return tokens, torch.stack(logits)


def assert_same_run(kernel_run, module_run):
    """Identical greedy tokens; logits equal up to the attention gate's sigmoid (libm's expf in C, SLEEF's in
    torch: one fp32 ulp apart at most, which bf16 rounding almost always hides)."""
    assert kernel_run[0] == module_run[0]
    assert (kernel_run[1] - module_run[1]).abs().max().item() <= 1e-2


@pytest.mark.parametrize("variant", ["bf16", "q8", "q4"])
def test_decode_steps_match_the_module_path(folders, variant, monkeypatch):
    engine = qwen3next.load(folders[variant], dtype="bfloat16", router_stats=False, quiet=True)
    prompt = [(7 * i) % 50 + 3 for i in range(250)]  # 250 + 12 steps: the KV buffer grows past 256 mid-run
    kernel_run = greedy_steps(engine.model, prompt, 12)
    assert all(layer._layer_kernel for layer in engine.model.model.layers), "every main layer took its kernel"
    without_layer_kernels(monkeypatch)
    assert_same_run(kernel_run, greedy_steps(engine.model, prompt, 12))


@pytest.mark.parametrize("variant", ["bf16", "q4"])
def test_a_verify_pass_matches_the_module_path(folders, variant, monkeypatch):
    """decode_steps over 4 positions: each position attends over its own prefix and DeltaNet keeps its states."""
    engine = qwen3next.load(folders[variant], dtype="bfloat16", router_stats=False, quiet=True)

    def verify():
        cache = engine.model.make_cache()
        with torch.inference_mode():
            engine.model(torch.tensor([[2, 7, 1, 8, 2, 8]]), cache)
            hidden, logits, states = engine.model.decode_steps(torch.tensor([[28, 18, 28, 45]]), cache)
        recurrent = [[s.recurrent for s in position if s is not None] for position in states]
        return hidden, logits, recurrent

    kernel = verify()
    without_layer_kernels(monkeypatch)
    modules = verify()
    assert (kernel[1] - modules[1]).abs().max().item() <= 1e-2
    assert torch.equal(kernel[1].argmax(-1), modules[1].argmax(-1))
    for ours, theirs in zip(kernel[2], modules[2]):
        assert all(torch.allclose(a, b, atol=1e-3) for a, b in zip(ours, theirs))


def test_the_kernels_follow_weights_that_move(models):
    """Weights changed after the kernels were built are used: a `.data` swap, a new Parameter (a norm's and a MoE
    block's), each compared on the decode steps with the module path reading the same weights; `Module.to()` and
    its kin drop the kernels, which the next step rebuilds. A decode step itself rebinds nothing."""
    from torch import nn

    engine = qwen3next.load(models("tiny"), dtype="bfloat16", router_stats=False, quiet=True)
    model, prompt = engine.model, [5, 9, 13, 2, 40]

    def decode_logits():  # the steps' logits, not the prefill's (which never takes the kernels)
        return greedy_steps(model, prompt, 4)[1][1:]

    def module_path_logits():
        with pytest.MonkeyPatch.context() as patch:
            without_layer_kernels(patch)
            patch.setattr(type(model.model.layers[0].mlp), "_fused_weights", lambda self, x: None)
            return decode_logits()

    before = decode_logits()
    rebinds = cpu_kernels.rebind_count()
    decode_logits()
    assert cpu_kernels.rebind_count() == rebinds
    layer, moe = model.model.layers[0], model.model.layers[0].mlp
    original_norm, original_gate = layer.input_layernorm.weight, moe.shared_expert_gate.weight
    norm_data = original_norm.data
    changes = [
        lambda: setattr(original_norm, "data", original_norm.data.clone() + 4.0),
        lambda: setattr(layer.input_layernorm, "weight", nn.Parameter(original_norm.data.clone() - 3.0)),
        lambda: setattr(moe.shared_expert_gate, "weight", nn.Parameter(original_gate.data.clone() * -8.0)),
    ]
    for change in changes:
        change()
        changed = decode_logits()
        assert not torch.equal(changed, before)
        assert (changed - module_path_logits()).abs().max().item() <= 1e-2
    original_norm.data = norm_data
    layer.input_layernorm.weight, moe.shared_expert_gate.weight = original_norm, original_gate
    assert torch.equal(decode_logits(), before)

    model.to(torch.bfloat16)
    assert all(layer._layer_kernel is None for layer in model.model.layers)
    assert torch.equal(decode_logits(), before)
    assert all(layer._layer_kernel for layer in model.model.layers)


def test_a_generation_checks_the_weights_once_and_the_next_one_sees_them_move(models):
    """generate trusts a layer kernel's first address check for the rest of its steps (cpu_kernels.WeightsFixed);
    a `.data` swap between two generations is seen by the second, which then matches the module path."""
    engine = qwen3next.load(models("tiny"), dtype="bfloat16", router_stats=False, quiet=True)
    model, prompt = engine.model, [5, 9, 13, 2, 40]
    request = qwen3next.Request(prompt=prompt, max_new_tokens=6, temperature=0)
    before = engine.complete(request).tokens
    norm = model.model.layers[0].input_layernorm.weight
    kernel = model.model.layers[0]._layer_kernel[1]
    with cpu_kernels.WeightsFixed():
        assert kernel.valid()
        moved = norm.data.clone() * -6.0
        norm.data = moved
        assert kernel.valid()  # the promise: within one block the first check stands
    assert not kernel.valid()  # outside, the move is seen at once
    after = engine.complete(request).tokens
    with pytest.MonkeyPatch.context() as patch:
        without_layer_kernels(patch)
        patch.setattr(type(model.model.layers[0].mlp), "_fused_weights", lambda self, x: None)
        expected = engine.complete(request).tokens
    assert after == expected and after != before


@pytest.mark.parametrize("variant", ["q8", "q4"])
def test_quantized_moe_blocks_take_the_fused_kernel_with_the_module_paths_results(folders, variant):
    """Routed experts as quantized blobs: a decode-sized MoE block runs as one call (router, experts in the
    router's order, shared expert and its gate, with the module path's roundings), and its two halves around
    acquiring experts (what an expert cache runs) give the same bits as the one call."""
    from qwen3next.moe import SparseMoE

    engine = qwen3next.load(folders[variant], dtype="bfloat16", router_stats=False, quiet=True)
    blocks = [m for m in engine.model.modules() if isinstance(m, SparseMoE)]
    generator = torch.Generator().manual_seed(0)
    same_routing = 0
    with torch.inference_mode():
        for block in blocks:
            for tokens in (1, 3):
                x = torch.randn(tokens, engine.model.config.hidden_size, generator=generator).bfloat16()
                fused = block(x, as_steps=True)
                kernel, ids = block._fused[1], block.last_routing.ids
                assert isinstance(kernel.struct, cpu_kernels.MoeQuant)
                block._fused = (block.store, None)  # the module path: route, shared expert, store.run
                plain = block(x, as_steps=True)
                block._fused = (block.store, kernel)
                if torch.equal(ids, block.last_routing.ids):  # a bf16 tie may route differently: compare the rest
                    same_routing += 1
                    assert torch.equal(fused, plain)
            one = x[:1]
            out, ids, routing, _ = cpu_kernels.moe_block(one, kernel.struct)
            ids2, routing2, _, gate_logit = cpu_kernels.moe_route(one, kernel.struct)
            assert torch.equal(ids, ids2) and torch.equal(routing, routing2)
            assert torch.equal(out, cpu_kernels.moe_experts(one, kernel.struct, ids2, routing2, gate_logit))
    assert same_routing >= len(blocks)  # most comparisons are not decided by a tie


def test_a_whole_step_in_one_call_has_the_bits_of_the_layer_by_layer_step(folders, monkeypatch):
    """Decode steps and a verify pass through q3n_decode_layers equal the same kernels called layer by layer, bit
    for bit; the routing observers still see every layer's choice."""
    from qwen3next import whole_step
    from qwen3next.moe import set_routing_observer

    calls = []
    decode_layers = cpu_kernels.decode_layers
    monkeypatch.setattr(cpu_kernels, "decode_layers", lambda *a: calls.append(1) or decode_layers(*a))
    for variant in ("bf16", "q8", "q4"):
        engine = qwen3next.load(folders[variant], dtype="bfloat16", router_stats=False, quiet=True)
        seen = []

        class Counter:
            needs_hidden = False

            def before_routing(self, layer, x):
                pass

            def routed(self, layer, ids):
                seen.append(layer)

        set_routing_observer(engine.model, Counter())
        prompt = [(5 * i) % 40 + 2 for i in range(20)]

        def runs():
            cache = engine.model.make_cache()
            with torch.inference_mode():
                engine.model(torch.tensor([[2, 7, 1, 8]]), cache)
                _, verify_logits, states = engine.model.decode_steps(torch.tensor([[28, 18, 28]]), cache)
            return greedy_steps(engine.model, prompt, 6), verify_logits, [s.recurrent for s in states[1] if s]

        calls.clear()
        whole, seen_whole = runs(), list(seen)
        assert len(calls) == 1 + 6, "the verify pass and every decode step took one call"
        assert len(seen_whole) == 9 * engine.model.config.num_hidden_layers  # 2 prefills, the pass, 6 steps
        seen.clear()
        with monkeypatch.context() as patch:
            patch.setattr(whole_step, "run_layers", lambda *a, **k: False)
            layer_by_layer = runs()
        assert seen == seen_whole
        assert whole[0][0] == layer_by_layer[0][0] and torch.equal(whole[0][1], layer_by_layer[0][1])
        assert torch.equal(whole[1], layer_by_layer[1])
        assert all(torch.equal(a, b) for a, b in zip(whole[2], layer_by_layer[2]))


def test_an_observer_that_needs_the_hidden_state_keeps_the_layer_by_layer_step(models):
    from qwen3next.moe import set_routing_observer

    engine = qwen3next.load(models("tiny"), dtype="bfloat16", router_stats=False, quiet=True)
    hidden_seen = []

    class Prefetcher:
        needs_hidden = True

        def before_routing(self, layer, x):
            hidden_seen.append(layer)

        def routed(self, layer, ids):
            pass

    set_routing_observer(engine.model, Prefetcher())
    greedy_steps(engine.model, [3, 4, 5], 3)
    layers = engine.model.config.num_hidden_layers
    assert len(hidden_seen) == 4 * layers  # the prefill and three steps, every layer shown its hidden state
