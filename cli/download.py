"""`qwen3next download`: fetch a model from the Hugging Face hub; prints the folder it is in."""

from __future__ import annotations

from pathlib import Path

import click

from qwen3next.errors import UsageError


@click.command("download")
@click.argument("repo_id")
@click.option("--revision", help="Branch, tag or commit id. [default: the default branch]")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Download into this folder instead of the Hugging Face cache.")
@click.option("--include", multiple=True, metavar="PATTERN", help="Only files matching this glob (repeatable).")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Skip files matching this glob (repeatable).")
@click.option("--quantize", "bits", type=click.Choice(["4", "8"]),
              help="Quantize while downloading (needs --out): each shard is converted when it arrives, then deleted.")
@click.option("--force", is_flag=True, help="With --quantize: replace --out if it exists and is not empty.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or notices on stderr.")
def download_command(repo_id, revision, out, include, exclude, bits, force, quiet):
    """Fetch a model from the Hugging Face hub: disk space checked first, every file verified.

    REPO_ID is like Qwen/Qwen3-Next-80B-A3B-Instruct. Prints the folder that holds the files. With
    --quantize 4|8 the weights are converted shard by shard as they arrive (`qwen3next quantize`'s
    format and default policy), so the disk never holds the whole bf16 model.
    """
    from qwen3next import hub  # huggingface_hub takes 0.2 s to import: only this command pays for it

    if bits is None:
        click.echo(str(hub.download(repo_id, revision=revision, out=out, include=include, exclude=exclude, quiet=quiet)))
        return
    if out is None:
        raise UsageError("--quantize needs --out DIR: the quantized model is not a hub snapshot, so it does not "
                         "go into the Hugging Face cache")
    click.echo(str(hub.download_quantized(repo_id, int(bits), out, revision=revision, include=include,
                                          exclude=exclude, quiet=quiet, force=force)))
