"""The `qwen3next` command group and its error boundary.

Every failure ends as one line on stderr and an exit code: 0 ok, 2 usage error (a flag, an
empty prompt, bad stdin), 1 anything else. Tracebacks only with --debug. stdout carries data
only (generated text, JSON); talk goes to stderr.
"""

from __future__ import annotations

import os
import sys

import click

from qwen3next.errors import Qwen3NextError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="qwen3next")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Run Qwen3-Next mixture-of-experts models locally."""
    ctx.obj = {"debug": debug}


def _register_commands() -> None:
    from .download import download_command
    from .evaluate import eval_command
    from .inspect_cmd import inspect_command
    from .quantize import quantize_command
    from .run import run
    from .serve import serve_command

    cli.add_command(run)
    cli.add_command(eval_command)
    cli.add_command(download_command)
    cli.add_command(inspect_command)
    cli.add_command(quantize_command)
    cli.add_command(serve_command)


def _fail(message: str, code: int) -> int:
    click.echo(f"qwen3next: error: {message}", err=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, map every failure to one line and an exit code."""
    _register_commands()
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        result = cli.main(args=args, prog_name="qwen3next", standalone_mode=False)
        return result if isinstance(result, int) else EXIT_OK  # click returns an Exit's code here
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.UsageError as exc:
        if debug:
            raise
        return _fail(exc.format_message(), EXIT_USAGE)
    except (click.exceptions.Abort, KeyboardInterrupt):
        return _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        # The reader went away (`| head`): point stdout at /dev/null so the exit flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except Qwen3NextError as exc:
        if debug:
            raise
        return _fail(str(exc), exc.exit_code)
    except Exception as exc:  # a bug: still one line by default, the traceback with --debug
        if debug:
            raise
        return _fail(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", EXIT_FAILURE)


if __name__ == "__main__":
    sys.exit(main())
