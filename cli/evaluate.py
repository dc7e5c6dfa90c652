"""`qwen3next eval`: perplexity, MTP accuracy and routing statistics of a model on a text file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from qwen3next.errors import UsageError
from qwen3next.evaluate import Evaluation, evaluate

from .options import load_engine, load_options


@click.command("eval")
@load_options(default_dtype="float32")
@click.option("--text", "text_path", required=True, type=click.Path(path_type=Path), help="UTF-8 text file to score.")
@click.option("--window", type=click.IntRange(min=3), default=256, show_default=True, help="Tokens per scored window.")
@click.option("--max-tokens", type=click.IntRange(min=3), help="Score only the first N tokens of the text.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or notices on stderr.")
def eval_command(text_path, window, max_tokens, as_json, quiet, **options):
    """Score a text: perplexity, next-next-token accuracy of the MTP head, routing statistics."""
    try:
        text = text_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--text {text_path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--text {text_path}: cannot read it as UTF-8 text ({exc})") from None
    with load_engine(options, quiet) as engine:
        result = evaluate(engine, text, window=window, max_tokens=max_tokens)
    click.echo(json.dumps(dataclasses.asdict(result), indent=2) if as_json else report(result))


def report(result: Evaluation) -> str:
    lines = [
        f"tokens read:          {result.tokens} ({result.predictions} next-token predictions scored)",
        f"perplexity:           {result.perplexity:.3f}",
        "MTP next-next top-1:  " + ("n/a (no MTP head)" if result.mtp_accuracy is None else f"{result.mtp_accuracy:.4f}"),
        f"unigram baseline:     {result.unigram_accuracy:.4f}",
        "",
        "layer  experts for 90%  busiest/mean  reuse t->t+1  L->L+1 recall  (popularity)",
    ]
    for i, r in enumerate(result.routing):
        recall = "" if r.next_layer_recall is None else f"{r.next_layer_recall:13.3f}  ({r.next_layer_popularity_recall:.3f})"
        lines.append(f"{i:5d}  {r.experts_for_90_percent:15.3f}  {r.busiest_to_mean_load:12.2f}  {r.reuse_next_token:12.3f}  {recall}")
    return "\n".join(lines)
