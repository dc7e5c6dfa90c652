"""Greedy decode speed with and without MTP speculative decoding, side by side, and the head's acceptance.

    python benchmarks/bench_speculative.py                       # the embedded demo model
    python benchmarks/bench_speculative.py --drafts 1,2,3 --rounds 5 --tokens 128
    python benchmarks/bench_speculative.py --text tests/data/heldout.txt --prompts 8   # held-out openings

Runs alternate between the settings (0 first, then each N, repeated --rounds times) so a noisy,
shared machine slows them alike; the table reports medians. Per setting: decode tok/s, the speed-up
over N=0, tokens per verify step, the drafts' acceptance rate, and what one verify step costs in
plain decode steps (its time over the N=0 time per token). Every run's tokens are checked equal to
the N=0 run's: the benchmark fails if speculation changed the output.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import qwen3next

PROMPTS = (
    "Once upon a time, in a small village by the river,",
    "The old lighthouse keeper looked at the sea and said",
)


def text_prompts(path: Path, count: int, characters: int = 300) -> list[str]:
    """The openings of the first `count` paragraphs of `path` long enough to give a prompt of `characters`."""
    paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
    return [" ".join(p.split())[:characters] for p in paragraphs if len(p) >= characters][:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder [default: the embedded demo model]")
    parser.add_argument("--drafts", default="1,2,3", help="draft tokens per step to compare with 0")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--text", type=Path, help="take the prompts from this text's paragraphs (e.g. held-out text)")
    parser.add_argument("--prompts", type=int, default=4, help="paragraphs of --text to use")
    args = parser.parse_args()
    prompts = text_prompts(args.text, args.prompts) if args.text else PROMPTS
    settings = [0] + [int(n) for n in args.drafts.split(",")]
    engine = qwen3next.load(args.model, quiet=True)
    runs: dict[int, list] = {n: [] for n in settings}
    for prompt in prompts:
        engine.complete(qwen3next.Request(prompt=prompt, max_new_tokens=8, temperature=0))  # warm-up
        for _ in range(args.rounds):
            reference = None
            for n in settings:
                result = engine.complete(qwen3next.Request(prompt=prompt, max_new_tokens=args.tokens, temperature=0,
                                                           speculative=n))
                reference = reference or result.tokens
                if result.tokens != reference:
                    raise SystemExit(f"speculative={n} changed the greedy output for {prompt!r}")
                runs[n].append(result.timings)
    base = statistics.median(t.decode_tokens_per_second for t in runs[0])
    print(f"{'N':>2} | {'decode tok/s':>12} | {'speed-up':>8} | {'tokens/verify':>13} | {'accepted':>8} | "
          f"{'verify cost (steps)':>19} | accepted by draft position")
    for n in settings:
        timings = runs[n]
        speed = statistics.median(t.decode_tokens_per_second for t in timings)
        steps, verifies = sum(t.decode_steps for t in timings), sum(t.verify_steps for t in timings)
        drafted, accepted = sum(t.drafted for t in timings), sum(t.accepted for t in timings)
        per_verify = steps / verifies if verifies else 1.0
        cost = per_verify * base / speed  # seconds per verify step over seconds per plain step
        by_position = [sum(column) for column in zip(*(t.accepted_by_position for t in timings))]
        reached = [sum(column) for column in zip(*(t.drafted_by_position for t in timings))]
        print(f"{n:>2} | {speed:>12.1f} | {speed / base:>7.2f}x | {per_verify:>13.2f} | "
              f"{accepted / drafted if drafted else 0:>8.1%} | {cost:>19.2f} | "
              + " ".join(f"{a / r:.1%}" for a, r in zip(by_position, reached)))


if __name__ == "__main__":
    main()
