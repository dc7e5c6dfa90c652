"""`qwen3next quantize`: convert a bf16/fp16/fp32 checkpoint to 4/8-bit; prints the output folder."""

from __future__ import annotations

import time
from pathlib import Path

import click

from qwen3next.errors import UsageError
from qwen3next.model_path import looks_like_repo_id, resolve_model_path
from qwen3next.quant import verify
from qwen3next.quant.convert import quantize_checkpoint
from qwen3next.quant.int4 import DEFAULT_GROUP
from qwen3next.quant.policy import Policy, parse_bits_for
from qwen3next.weights import format_bytes


def _say(quiet: bool):
    return (lambda message: None) if quiet else (lambda message: click.echo(f"qwen3next: {message}", err=True))


@click.command("quantize")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True,
              help="Bits for the routed experts (the rest follows the policy in docs/quantization.md).")
@click.option("--group-size", type=click.Choice(["32", "64", "128", "256"]), default=str(DEFAULT_GROUP),
              show_default=True, help="Input weights sharing one 4-bit scale and minimum.")
@click.option("--keep", multiple=True, metavar="PATTERN",
              help="Store matching tensors unquantized (glob over hub names; repeatable).")
@click.option("--bits-for", multiple=True, metavar="PATTERN=BITS",
              help="Store matching matrices at 4 or 8 bits, e.g. '*.self_attn.*=4' (repeatable; later wins).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--verify", is_flag=True, help="Report per-tensor errors and logit KL / top-1 against SRC.")
@click.option("--verify-text", type=click.Path(path_type=Path), metavar="FILE",
              help="UTF-8 text for --verify's end-to-end check [default: a built-in paragraph].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or notices on stderr.")
def quantize_command(src, out, bits, group_size, keep, bits_for, force, verify, verify_text, quiet):
    """Quantize the checkpoint in SRC (a folder, or a hub id already downloaded) into OUT, streaming shard by
    shard (resumes if interrupted).

    Routed experts go to --bits, packed one contiguous blob per expert for offloading; the format
    is in docs/format.md. Prints OUT when done.
    """
    say = _say(quiet)
    src = _source_folder(src)
    text = _read_text(verify_text) if verify_text else None
    policy = Policy(int(bits), keep=keep, bits_for=parse_bits_for(bits_for))
    started = time.perf_counter()
    errors = quantize_checkpoint(src, out, policy, int(group_size), force=force, progress=not quiet,
                                 measure=verify, say=say)
    seconds = time.perf_counter() - started
    say(f"wrote {out} in {seconds:.1f} s")
    if verify:
        _verify(src, out, errors, text, say)
    click.echo(str(out))


def _source_folder(src: Path) -> Path:
    """SRC as given, or the local Hugging Face cache's snapshot when it is a downloaded hub id."""
    return resolve_model_path(str(src)) if not src.exists() and looks_like_repo_id(str(src)) else src


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--verify-text {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--verify-text {path}: cannot read it as UTF-8 text ({exc})") from None


def _verify(src: Path, out: Path, errors, text: str | None, say) -> None:
    """The verification report goes to stderr even with --quiet: it was asked for."""
    report = [f"verify: {line}" for line in verify.tensor_summary(errors)]
    fits, needed = verify.fits_in_memory(src, out)
    if not fits:
        report.append(f"verify: end-to-end check skipped: both models need ~{format_bytes(needed)} of RAM")
    else:
        result = verify.end_to_end(src, out, text or verify.SAMPLE_TEXT)
        report.append(f"verify: {result.tokens} tokens: KL(source || quantized) {result.kl:.5f} nats/token, "
                      f"top-1 agreement {100 * result.top1:.1f}%, perplexity {result.perplexity_source:.3f} -> "
                      f"{result.perplexity_quantized:.3f} "
                      f"({100 * (result.perplexity_quantized / result.perplexity_source - 1):+.2f}%)")
    for line in report:
        click.echo(f"qwen3next: {line}", err=True)
