"""The options every command that loads a model shares (run, eval, serve): one definition.

Each flag is a `qwen3next.load()` keyword with dashes; a library error naming the keyword is
reported as the flag (`as_flags`).
"""

from __future__ import annotations

from typing import Callable

import click

from qwen3next.engine import Engine, load
from qwen3next.errors import RequestError, UsageError
from qwen3next.offload.expert_cache import POLICIES

LOAD_KEYWORDS = ("model_path", "dtype", "device", "cpu_mem", "gpu_mem", "max_context", "expert_policy", "router_stats",
                 "prefetch", "threads")


def dtype_option(default: str) -> Callable:
    """--dtype: the dtype the model computes in (commands differ in their default)."""
    return click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=default,
                        show_default=True)


def placement_options() -> list[Callable]:
    """--cpu-mem, --gpu-mem, --max-context: what the memory plan is made from (loading, and `inspect --plan`)."""
    return [
        click.option("--cpu-mem", metavar="SIZE", help="RAM the model may use, e.g. 12G or 512M (weights, context, "
                     "expert cache) [default: what is free]; routed experts that do not fit are read from disk."),
        click.option("--gpu-mem", metavar="SIZE", help="GPU memory the model may use; 0 means use no GPU."),
        click.option("--max-context", type=int, metavar="N",
                     help="Tokens of context the memory budget reserves [default: what the budget leaves room for, "
                          "at most 32768 or the model's context]."),
    ]


def with_options(flags: list[Callable]) -> Callable:
    """Decorate a command with `flags`, shown in --help in the order given."""
    def decorate(command: Callable) -> Callable:
        for flag in reversed(flags):
            command = flag(command)
        return command

    return decorate


def load_options(default_dtype: str) -> Callable:
    """Decorate a command with the model and placement flags (passed on as LOAD_KEYWORDS)."""
    return with_options([
        click.option("--model", "-m", "model_path", metavar="PATH",
                     help="Model folder, or a hub id already downloaded [default: the embedded demo model]."),
        dtype_option(default_dtype),
        click.option("--device", help="cpu, cuda, cuda:1, ... [default: cuda if available]"),
        *placement_options(),
        click.option("--expert-policy", type=click.Choice(POLICIES), default="stats", show_default=True,
                     help="Which cached expert to evict first."),
        click.option("--prefetch/--no-prefetch", default=False, show_default=True,
                     help="Read the next layer's likely experts ahead when experts come from disk."),
        click.option("--no-router-stats", "router_stats", flag_value=False, default=True,
                     help="Do not read or update the per-model router statistics (~/.cache/qwen3next)."),
        click.option("--threads", type=click.IntRange(min=1), metavar="N",
                     help="CPU threads for the kernels [default: the physical cores]."),
    ])


def load_engine(options: dict, quiet: bool) -> Engine:
    """Load with the LOAD_KEYWORDS popped from a command's options."""
    keywords = {name: options.pop(name) for name in LOAD_KEYWORDS}
    path = keywords.pop("model_path")
    engine = as_flags(lambda: load(path, progress=not quiet, quiet=quiet, **keywords))
    if engine.plan is not None and not quiet:
        click.echo(f"qwen3next: {engine.plan.summary()}", err=True)
    return engine


def as_flags(make: Callable):
    """Call make(); a RequestError names a library field, which on the command line is a flag."""
    try:
        return make()
    except RequestError as exc:
        raise UsageError(f"--{exc.field.replace('_', '-')} {exc.value!r}: {exc.rule}") from None
