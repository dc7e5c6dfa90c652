"""`qwen3next run`: generate text from a prompt (or one JSON request per stdin line with --jsonl)."""

from __future__ import annotations

import json
import sys
from typing import TextIO

import click

from qwen3next.engine import Engine, load
from qwen3next.errors import Qwen3NextError, UsageError

from .stats import format_stats

# JSONL request keys and the generate() arguments they map to.
_REQUEST_KEYS = {"max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop",
                 "chat", "system"}


@click.command()
@click.option("--model", "-m", "model_path", metavar="PATH",
              help="Model folder, or a hub id already downloaded [default: the embedded demo model].")
@click.option("--prompt", "-p", help="The prompt; read from stdin when omitted.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template as a user message.")
@click.option("--system", help="System message (implies --chat).")
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=0), default=256, show_default=True)
@click.option("--temperature", "-t", type=click.FloatRange(min=0), help="0 means greedy. [default: generation_config.json]")
@click.option("--top-k", type=click.IntRange(min=0), help="[default: generation_config.json]")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), help="[default: generation_config.json]")
@click.option("--min-p", type=click.FloatRange(min=0, max=1, max_open=True))
@click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True))
@click.option("--seed", type=int, help="Make sampling reproducible.")
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable); it is not printed.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
@click.option("--device", help="cpu, cuda, cuda:1, ... [default: cuda if available]")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=512, show_default=True,
              help="Prompt tokens per prefill step (bounds peak memory on long prompts).")
@click.option("--jsonl", is_flag=True, help='Read one JSON request per stdin line ({"prompt": ..., ...}); '
              "answer each with one JSON line.")
@click.option("--stats", is_flag=True, help="Print token counts, speeds and peak memory to stderr.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or notices on stderr.")
def run(model_path, prompt, chat, system, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
        seed, stop, dtype, device, prefill_chunk, jsonl, stats, quiet):
    """Generate text: the prompt from --prompt or stdin, only the generated text on stdout."""
    if jsonl and prompt is not None:
        raise UsageError("--jsonl reads requests from stdin; it cannot be combined with --prompt")
    if not jsonl and prompt is None:
        prompt = _read_stdin_prompt()
    if not jsonl and not prompt.strip():
        raise UsageError("--prompt is empty")
    engine = load(model_path, dtype=dtype, device=device, progress=not quiet, quiet=quiet)
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   repetition_penalty=repetition_penalty, seed=seed, stop=stop, chat=chat, system=system,
                   prefill_chunk=prefill_chunk)
    if jsonl:
        failures = _serve_jsonl(engine, options, sys.stdin, stats)
        if failures:
            raise click.exceptions.Exit(1)
        return
    for token in engine.generate(prompt, **options):
        sys.stdout.write(token.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if stats:
        click.echo(format_stats(engine.last_stats, engine.device), err=True)


def _read_stdin_prompt() -> str:
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("no prompt: pass --prompt TEXT or pipe the prompt on stdin")
    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"stdin: not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    if not text.strip():
        raise UsageError("stdin: the prompt is empty")
    return text


def _serve_jsonl(engine: Engine, defaults: dict, lines: TextIO, stats: bool) -> int:
    """Answer each request line with one JSON line; a bad line gets {"error": ...}. Returns the failure count."""
    failures = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            prompt, overrides = _parse_request(line, number)
            tokens = list(engine.generate(prompt, **{**defaults, **overrides}))
            s = engine.last_stats
            answer = {"text": "".join(t.text for t in tokens), "tokens": [t.token for t in tokens],
                      "finish_reason": s.finish_reason, "prompt_tokens": s.prompt_tokens}
            if stats:
                click.echo(f"line {number}: " + format_stats(s, engine.device), err=True)
        except Qwen3NextError as exc:
            failures += 1
            answer = {"error": str(exc), "line": number}
        sys.stdout.write(json.dumps(answer, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    return failures


def _parse_request(line: str, number: int) -> tuple[object, dict]:
    try:
        request = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(f"stdin line {number}: not valid JSON ({exc.msg})") from None
    if not isinstance(request, dict):
        raise UsageError(f"stdin line {number}: expected a JSON object")
    prompt = request.get("prompt", request.get("messages"))
    if prompt is None:
        raise UsageError(f'stdin line {number}: needs "prompt" (text or token ids) or "messages"')
    unknown = set(request) - _REQUEST_KEYS - {"prompt", "messages"}
    if unknown:
        raise UsageError(f"stdin line {number}: unknown key(s) {sorted(unknown)}")
    overrides = {k: v for k, v in request.items() if k in _REQUEST_KEYS}
    if overrides.get("max_new_tokens", 0) is None:
        raise UsageError(f'stdin line {number}: "max_new_tokens" must be an integer')
    return prompt, overrides
