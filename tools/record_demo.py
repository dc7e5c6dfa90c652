"""Measure a trained demo model and write the figures the tests hold it to into its demo.json.

    python tools/record_demo.py qwen3next/demo_model tests/data/heldout.txt

Records (in float32, so the figures do not depend on the CPU kernels): held-out perplexity and
MTP accuracy on the first EVAL_TOKENS tokens in windows of EVAL_WINDOW, the unigram baseline,
routing statistics, and the greedy continuation of GREEDY_PROMPT.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import qwen3next
from qwen3next.evaluate import evaluate

EVAL_TOKENS = 16384
EVAL_WINDOW = 256
GREEDY_PROMPT = "It is a truth universally acknowledged, that"
GREEDY_TOKENS = 24


def record(model: Path, heldout: Path) -> dict:
    engine = qwen3next.load(model, dtype="float32", device="cpu", quiet=True)
    result = evaluate(engine, heldout.read_text(encoding="utf-8"), window=EVAL_WINDOW, max_tokens=EVAL_TOKENS)
    tokens = list(engine.generate(GREEDY_PROMPT, max_new_tokens=GREEDY_TOKENS, temperature=0))
    figures = {
        "heldout": {"file": heldout.name, "tokens": EVAL_TOKENS, "window": EVAL_WINDOW, **dataclasses.asdict(result)},
        "greedy": {"prompt": GREEDY_PROMPT, "tokens": [t.token for t in tokens], "text": "".join(t.text for t in tokens)},
    }
    path = model / "demo.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**summary, **figures}, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    out = record(Path(sys.argv[1]), Path(sys.argv[2]))
    print(json.dumps({k: v for k, v in out["heldout"].items() if k != "routing"}, indent=2))
    print(repr(out["greedy"]["text"]))
