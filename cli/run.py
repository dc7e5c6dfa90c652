"""`qwen3next run`: generate text from a prompt (or one JSON request per stdin line with --jsonl)."""

from __future__ import annotations

import json
import sys
from typing import TextIO

import click

from qwen3next.engine import Engine
from qwen3next.errors import Qwen3NextError, RequestError, UsageError
from qwen3next.request import MAX_NEW_TOKENS, OFFLOAD_PREFILL_CHUNK, PREFILL_CHUNK, Request, Token

from .options import as_flags, load_engine, load_options
from .stats import format_stats, stats_object

# run's options that are Request fields (the flag is the field name with dashes).
_REQUEST_OPTIONS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop",
                    "chat", "system", "prefill_chunk", "speculative")


@click.command()
@load_options(default_dtype="bfloat16")
@click.option("--prompt", "-p", help="The prompt; read from stdin when omitted.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template as a user message.")
@click.option("--system", help="System message (implies --chat).")
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=0), default=MAX_NEW_TOKENS, show_default=True)
@click.option("--temperature", "-t", type=click.FloatRange(min=0), help="0 means greedy. [default: generation_config.json]")
@click.option("--top-k", type=click.IntRange(min=0), help="[default: generation_config.json]")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), help="[default: generation_config.json]")
@click.option("--min-p", type=click.FloatRange(min=0, max=1, max_open=True))
@click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True))
@click.option("--seed", type=int, help="Make sampling reproducible.")
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable); it is not printed.")
@click.option("--prefill-chunk", type=click.IntRange(min=1),
              help=f"Prompt tokens per prefill step (bounds peak memory on long prompts) [default: {PREFILL_CHUNK}; "
              f"{OFFLOAD_PREFILL_CHUNK} when experts are read from disk].")
@click.option("--speculative", type=int, metavar="N",
              help="Draft N tokens per step with the model's MTP head and verify them in one pass: greedy output "
              "unchanged, sampled output from the same distribution (docs/speculative.md) [default: 0, off].")
@click.option("--jsonl", is_flag=True, help='Read one JSON request per stdin line ({"prompt": ..., ...}); '
              "answer each with one JSON line.")
@click.option("--stats", is_flag=True, help="Print token counts, speeds and peak memory to stderr.")
@click.option("--stats-json", type=click.Path(dir_okay=False, writable=True), metavar="FILE",
              help="Write the same figures as one JSON object to FILE (one line per request with --jsonl).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or notices on stderr.")
def run(prompt, jsonl, stats, stats_json, quiet, **options):
    """Generate text: the prompt from --prompt or stdin, only the generated text on stdout."""
    if jsonl and prompt is not None:
        raise UsageError("--jsonl reads requests from stdin; it cannot be combined with --prompt")
    fields = {name: options[name] for name in _REQUEST_OPTIONS if options[name] not in (None, ())}
    request = None
    if not jsonl:
        request = as_flags(lambda: Request(prompt=_read_stdin_prompt() if prompt is None else prompt, **fields))
    report = _Report(stats, stats_json)
    with load_engine(options, quiet) as engine:
        if jsonl:
            if _serve_jsonl(engine, fields, sys.stdin, report):
                raise click.exceptions.Exit(1)
            return
        for event in as_flags(lambda: engine.stream(request)):
            if isinstance(event, Token):
                sys.stdout.write(event.text)
                sys.stdout.flush()
            else:
                report(event, engine)
        sys.stdout.write("\n")


class _Report:
    """--stats (a line on stderr) and --stats-json (a JSON object per request, appended to a file)."""

    def __init__(self, text: bool, path: str | None):
        self.text, self.path = text, path
        if path is not None:
            try:
                open(path, "w").close()
            except OSError as exc:
                raise UsageError(f"--stats-json {path}: cannot write it ({exc.strerror})") from None

    def __call__(self, result, engine: Engine, prefix: str = "") -> None:
        if self.text:
            click.echo(prefix + format_stats(result, engine), err=True)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(stats_object(result, engine)) + "\n")


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


def _serve_jsonl(engine: Engine, defaults: dict, lines: TextIO, report: "_Report") -> int:
    """Answer each request line with one JSON line (the Result); a bad line gets {"error": ...,
    "field": ..., "line": ...}. The flags given on the command line are the defaults of every line.
    Returns the failure count."""
    failures = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            result = engine.complete(Request.from_dict(_decode_line(line, number), defaults))
            answer = {k: v for k, v in result.as_dict().items() if k != "timings"}  # timings: --stats, on stderr
            report(result, engine, prefix=f"line {number}: ")
        except Qwen3NextError as exc:
            failures += 1
            answer = {"error": str(exc), "line": number}
            if isinstance(exc, RequestError):
                answer["field"] = exc.field
        sys.stdout.write(json.dumps(answer, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    return failures


def _decode_line(line: str, number: int) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(f"stdin line {number}: not valid JSON ({exc.msg})") from None
