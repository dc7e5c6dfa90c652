"""Where one decode step's time goes, per module kind: the numbers behind performance.md's breakdown.

    python benchmarks/decode_breakdown.py MODEL [--steps 32]

Wraps the forward of each MoE block, shared expert, attention and DeltaNet layer, the expert store's
run and the lm_head projection with timers, prefills 64 tokens, then times --steps single-token steps
(bf16, CPU). Nested modules are counted in their parents too (the MoE block includes its experts).
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

import qwen3next


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    engine = qwen3next.load(args.model)
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
