"""Time to first token in a chat, turn by turn, with and without chat-turn state reuse (docs/serving.md).

    python benchmarks/bench_serve.py                                   # the demo model
    python benchmarks/bench_serve.py --model ./q4 --cpu-mem 12G --user-tokens 400

A conversation of --turns turns goes through the real server (started in this process on 127.0.0.1)
and the official openai client, as a chat front-end would send it: every turn resends the whole
history plus a user message of about --user-tokens tokens of held-out text, and streams a greedy
reply of --reply-tokens tokens. The time to first token is measured at the client, from sending
the request to the first content chunk. The conversation runs --repeats times with the server
keeping turn states (Engine.keep_prefix_states) and as often without, alternately, and the medians
are printed side by side, with the prompt tokens each turn had and how many of them were reused.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx2
import openai
import uvicorn

import qwen3next
from qwen3next.prefix_cache import SNAPSHOTS
from qwen3next.server.app import create_app

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "heldout.txt"


def user_messages(engine, turns: int, tokens: int) -> list[str]:
    """Consecutive passages of held-out text, each about `tokens` tokens, as the user's messages."""
    words = TEXT.read_text(encoding="utf-8").split()[2000:]  # past the title pages
    per_word = len(engine.tokenizer.encode(" ".join(words[:1000]))) / 1000
    size = max(1, int(tokens / per_word))
    return [" ".join(words[i * size:(i + 1) * size]) for i in range(turns)]


def conversation(client, model: str, messages: list[str], reply_tokens: int) -> list[dict]:
    """Per turn: time to first token (s), prompt tokens, reused prompt tokens."""
    history, turns = [], []
    for text in messages:
        history.append({"role": "user", "content": text})
        started = time.perf_counter()
        first, reply, usage = None, [], None
        stream = client.chat.completions.create(model=model, messages=history, max_tokens=reply_tokens, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                reply.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
        turns.append({"ttft": (first or time.perf_counter()) - started, "prompt": usage.prompt_tokens,
                      "reused": usage.prompt_tokens_details.cached_tokens})
        history.append({"role": "assistant", "content": "".join(reply)})
    return turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder or hub id [default: the demo model]")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--cpu-mem")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--user-tokens", type=int, default=200)
    parser.add_argument("--reply-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    engine = qwen3next.load(args.model, dtype=args.dtype, cpu_mem=args.cpu_mem, router_stats=False, quiet=True)
    messages = user_messages(engine, args.turns, args.user_tokens)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "bench", log=lambda line: None), host="127.0.0.1",
                                           port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                           http_client=httpx2.Client(trust_env=False, timeout=3600))

    runs: dict[str, list[list[dict]]] = {"reuse": [], "fresh": []}
    conversation(client, "bench", messages[:1], 4)  # warm-up: first-call costs out of the figures
    for _ in range(args.repeats):
        for mode in runs:
            engine.keep_prefix_states(SNAPSHOTS if mode == "reuse" else 0)  # the server's default, or off
            runs[mode].append(conversation(client, "bench", messages, args.reply_tokens))
    server.should_exit = True

    print(f"model {args.model or 'demo'} ({args.dtype}, {engine.compute}); {args.turns} turns, user messages of "
          f"~{args.user_tokens} tokens, replies of {args.reply_tokens}; median of {args.repeats}")
    print(f"{'turn':>4} {'prompt':>7} {'reused':>7} {'TTFT fresh':>11} {'TTFT reused':>12} {'speed-up':>9}")
    for turn in range(args.turns):
        fresh = statistics.median(run[turn]["ttft"] for run in runs["fresh"])
        reused = statistics.median(run[turn]["ttft"] for run in runs["reuse"])
        sample = runs["reuse"][0][turn]
        print(f"{turn + 1:>4} {sample['prompt']:>7} {sample['reused']:>7} {fresh * 1000:>9.0f}ms "
              f"{reused * 1000:>10.0f}ms {fresh / reused:>8.1f}x")


if __name__ == "__main__":
    main()
