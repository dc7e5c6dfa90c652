"""What choosing a token costs, against the torch calls the sampler used before: µs per call, alternating.

    python benchmarks/bench_sampler.py [--vocab 6144] [--calls 2000]

On a small model the sampler is a sizeable part of a token (a demo decode step is ~1 ms). Compared:
one draw (Sampler.sample, inverting the cumulative sum, against torch.multinomial), top-p after top-k
(sorting the k candidates left, against sorting the vocabulary), and the whole filtered draw with the
demo model's generation_config.json settings (temperature 0.7, top-k 20, top-p 0.8, repetition
penalty 1.05 over a 300-token history).
"""

from __future__ import annotations

import argparse
import time

import torch

from qwen3next import sampling
from qwen3next.sampling import Sampler, SamplingParams, _top_p


def full_sort_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The reference: top-p over the whole sorted vocabulary."""
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = probs.cumsum(-1) - probs >= top_p
    return torch.empty_like(logits).scatter_(0, order, sorted_logits.masked_fill(drop, float("-inf")))


class ReferenceSampler(Sampler):
    """The sampler as it was: torch.multinomial for the draw, top-p over the sorted vocabulary."""

    def sample(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def __call__(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> int:
        sampling._top_p = full_sort_top_p
        try:
            return super().__call__(logits, history)
        finally:
            sampling._top_p = _top_p


def microseconds(function, calls: int) -> float:
    for _ in range(50):
        function()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=6144)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(args.vocab, generator=generator) * 3
    probs = torch.softmax(logits, -1)
    after_top_k = logits.masked_fill(logits < torch.topk(logits, 20).values[-1], float("-inf"))
    history = torch.randint(0, args.vocab, (300,), generator=generator)
    demo = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)
    sampler, reference = Sampler(demo, seed=0), ReferenceSampler(demo, seed=0)
    cases = {
        "one draw": (lambda: sampler.sample(probs), lambda: torch.multinomial(probs, 1, generator=generator)),
        "top-p after top-k 20": (lambda: _top_p(after_top_k, 0.8), lambda: full_sort_top_p(after_top_k, 0.8)),
        "demo settings, filters + draw": (lambda: sampler(logits, history), lambda: reference(logits, history)),
    }
    print(f"{'µs per call':<30} {'ours':>8} {'before':>8}")
    for _ in range(args.rounds):
        for name, (ours, before) in cases.items():
            print(f"{name:<30} {microseconds(ours, args.calls):8.1f} {microseconds(before, args.calls):8.1f}")


if __name__ == "__main__":
    main()
