"""`qwen3next download`: fetch a model from the Hugging Face hub; prints the folder it is in."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("download")
@click.argument("repo_id")
@click.option("--revision", help="Branch, tag or commit id. [default: the default branch]")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Download into this folder instead of the Hugging Face cache.")
@click.option("--include", multiple=True, metavar="PATTERN", help="Only files matching this glob (repeatable).")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Skip files matching this glob (repeatable).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or notices on stderr.")
def download_command(repo_id, revision, out, include, exclude, quiet):
    """Fetch a model from the Hugging Face hub: disk space checked first, every file verified.

    REPO_ID is like Qwen/Qwen3-Next-80B-A3B-Instruct. Prints the folder that holds the files.
    """
    from qwen3next.hub import download  # huggingface_hub takes 0.2 s to import: only this command pays for it

    click.echo(str(download(repo_id, revision=revision, out=out, include=include, exclude=exclude, quiet=quiet)))
