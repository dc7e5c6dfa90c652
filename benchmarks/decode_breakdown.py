"""Where one decode step's time goes: per module kind, or C kernels against Python, layer kernels against modules.

    python benchmarks/decode_breakdown.py MODEL [--steps 32]
    python benchmarks/decode_breakdown.py qwen3next/demo_model --kernels --steps 300 --rounds 3
    python benchmarks/decode_breakdown.py MODEL --generate 300 --rounds 3

Default: wraps the forward of each MoE block, shared expert, attention and DeltaNet layer, the expert
store's run and the lm_head projection with timers, prefills 64 tokens, then times --steps single-token
steps (bf16, CPU). Nested modules are counted in their parents too (the MoE block includes its experts).
With the one-call layer kernels (csrc/layer_kernels.c) a layer's mixer no longer runs its module's
forward, so this view shows the MoE blocks and lm_head only.

--generate N: the user's path instead, `Engine.complete` of N greedy tokens after a 16-token prompt, best of
--rounds: ms per decode step, and how much of it was inside the C library's calls (the rest: Python, torch ops,
dispatch). With PYTHONPATH on another checkout's import folder (bench_kernels.py's `import_tree`) it measures
that tree's engine, for before-and-after figures.

--kernels: the step with the one-call kernels against the paths they replace, alternating for
--rounds rounds: the whole step in one call (whole_step.py); the same kernels called layer by layer;
the MoE blocks through their modules as well (router, shared expert and store.run apart); and the
module path (no layer kernels either). For each the
time spent inside the C library's calls (timed around each ctypes call) against the rest: Python,
torch ops and dispatch.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

import qwen3next
from qwen3next import cpu_kernels, whole_step
from qwen3next.model import DecoderLayer
from qwen3next.moe import SparseMoE


def timed(record: dict, name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        record[name] += time.perf_counter() - start
        return result
    return wrapper


def instrument(engine) -> dict[str, float]:
    """Seconds per module kind, accumulated by timers wrapped around the model's forwards (and the store's run)."""
    model, seconds = engine.model, collections.defaultdict(float)
    for layer in model.model.layers:
        mixer = getattr(layer, "self_attn", None) or layer.linear_attn
        mixer.forward = timed(seconds, type(mixer).__name__, mixer.forward)
        layer.mlp.forward = timed(seconds, "MoE block", layer.mlp.forward)
        layer.mlp.shared_expert.forward = timed(seconds, "shared expert", layer.mlp.shared_expert.forward)
    engine.expert_store.run = timed(seconds, "routed experts (store.run)", engine.expert_store.run)
    model.logits_from_hidden = timed(seconds, "lm_head", model.logits_from_hidden)
    return seconds


class TimedLibrary:
    """The kernel library with a timer around every call, summed into `seconds`."""

    def __init__(self, library, seconds: list[float]):
        self.library, self.seconds = library, seconds

    def __getattr__(self, name: str):
        function = getattr(self.library, name)

        def timed_call(*args):
            start = time.perf_counter()
            result = function(*args)
            self.seconds[0] += time.perf_counter() - start
            return result
        return timed_call


def step_seconds(model, steps: int, in_c: list[float] | None = None) -> float:
    """Seconds per one-token step after a 64-token prefill (in_c, a TimedLibrary's counter, restarts there)."""
    cache = model.make_cache()
    with torch.inference_mode():
        model(torch.tensor([list(range(100, 164))]), cache, last_only=True)
        if in_c is not None:
            in_c[0] = 0.0
        start = time.perf_counter()
        for step in range(steps):
            model(torch.tensor([[5 + step]]), cache, last_only=True)
    return (time.perf_counter() - start) / steps


def compare_paths(engine, steps: int, rounds: int) -> None:
    """The fused kernels against the module paths, alternating; each also with its C time counted."""
    library = cpu_kernels.library()
    if library is None:
        raise SystemExit("--kernels: the C kernels are not loaded here")
    switches = (DecoderLayer._mixer_step, SparseMoE._fused_weights, whole_step.run_layers)
    mixer_off, moe_off, whole_off = lambda self, x, cache, as_steps: None, lambda self, x: None, lambda *a, **k: False
    paths = {"whole step": switches, "layer by layer": (switches[0], switches[1], whole_off),
             "MoE modules": (switches[0], moe_off, whole_off), "module path": (mixer_off, moe_off, whole_off)}
    print(f"{'path':<14} {'ms/step':>8} {'tok/s':>7} | {'in C':>7} {'the rest':>8} (ms/step, a timed run)")
    for _ in range(rounds):
        for name, (mixer, moe, whole) in paths.items():
            DecoderLayer._mixer_step, SparseMoE._fused_weights, whole_step.run_layers = mixer, moe, whole
            plain = step_seconds(engine.model, steps)
            in_c = [0.0]
            cpu_kernels._lib = TimedLibrary(library, in_c)
            try:
                timed = step_seconds(engine.model, steps, in_c)
            finally:
                cpu_kernels._lib = library
            c = in_c[0] / steps
            print(f"{name:<14} {plain * 1e3:8.3f} {1 / plain:7.0f} | {c * 1e3:7.3f} {(timed - c) * 1e3:8.3f}")
    DecoderLayer._mixer_step, SparseMoE._fused_weights, whole_step.run_layers = switches


def generate_split(engine, new_tokens: int, rounds: int) -> None:
    """Decode steps through Engine.complete: the fastest round's ms per step, and the least time outside C."""
    library = cpu_kernels.library()
    if library is None:
        raise SystemExit("--generate: the C kernels are not loaded here")
    engine.eos_ids = []  # the full count every round
    request = qwen3next.Request(prompt=list(range(100, 116)), max_new_tokens=new_tokens, temperature=0)
    engine.complete(request)  # warm-up: the kernels' structs are built here
    in_c = [0.0]
    cpu_kernels._lib = TimedLibrary(library, in_c)
    step, outside = float("inf"), float("inf")
    try:
        for _ in range(rounds):
            items = engine.stream(request)
            next(items)  # the first token comes from the prefill: count the C time of the decode steps only
            in_c[0] = 0.0
            result = [item for item in items if isinstance(item, qwen3next.Result)][0]
            timings = result.timings
            step = min(step, timings.decode_seconds / timings.decode_steps)
            outside = min(outside, (timings.decode_seconds - in_c[0]) / timings.decode_steps)
    finally:
        cpu_kernels._lib = library
    print(f"decode step {step * 1e3:.3f} ms ({1 / step:.0f} tok/s), outside C {outside * 1e3:.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--kernels", action="store_true", help="layer kernels against the module path")
    parser.add_argument("--rounds", type=int, default=3, help="with --kernels: alternating rounds; --generate: rounds")
    parser.add_argument("--generate", type=int, metavar="N", help="time N decode steps through Engine.complete")
    args = parser.parse_args()
    engine = qwen3next.load(args.model)
    if args.generate:
        generate_split(engine, args.generate, args.rounds)
        return
    if args.kernels:
        compare_paths(engine, args.steps, args.rounds)
        return
    model, seconds = engine.model, instrument(engine)
    cache = model.make_cache()
    with torch.no_grad():
        model(torch.tensor([list(range(100, 164))]), cache, last_only=True)
        seconds.clear()
        start = time.perf_counter()
        for step in range(args.steps):
            model(torch.tensor([[5 + step]]), cache, last_only=True)
        total = time.perf_counter() - start
    for name, spent in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f"{name:<28} {spent / args.steps * 1e3:7.2f} ms/token")
    print(f"{'whole step':<28} {total / args.steps * 1e3:7.2f} ms/token ({args.steps / total:.1f} tok/s)")


if __name__ == "__main__":
    main()
