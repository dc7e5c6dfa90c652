"""`qwen3next serve`: the model behind an OpenAI-compatible HTTP API (qwen3next/server/)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import click

from qwen3next.errors import Qwen3NextError
from qwen3next.model_path import looks_like_repo_id
from qwen3next.offload.budget import format_size, parse_size
from qwen3next.prefix_cache import SNAPSHOTS
from qwen3next.server import MAX_BODY, MAX_QUEUE

from .options import as_flags, load_engine, load_options

DEMO_MODEL_ID = "qwen3next-demo"


class MissingExtra(Qwen3NextError):
    """The serve extra is not installed."""


@click.command("serve")
@load_options(default_dtype="bfloat16")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but a loopback address is reachable from the network.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="QWEN3NEXT_API_KEY", metavar="KEY",
              help="Require `Authorization: Bearer KEY` on every endpoint but /health [env: QWEN3NEXT_API_KEY].")
@click.option("--served-model-name", metavar="NAME",
              help="The model id clients must name [default: the hub id or folder name].")
@click.option("--max-queue", type=click.IntRange(min=1), default=MAX_QUEUE, show_default=True,
              help="Requests that may wait behind the running one; more are answered 503.")
@click.option("--max-body", metavar="SIZE", help=f"Largest request body; a larger one is answered 413 "
              f"[default: {format_size(MAX_BODY)}].")
@click.option("--prefix-states", type=click.IntRange(min=0), default=SNAPSHOTS, show_default=True,
              help="Turn-boundary states kept so a chat turn prefills only its new tokens (0: off).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or notices on stderr (the access log stays).")
@click.pass_context
def serve_command(ctx, host, port, api_key, served_model_name, max_queue, max_body, prefix_states, quiet, **options):
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models)."""
    try:  # before the model loads: a missing extra should not cost a load
        import uvicorn

        from qwen3next.server.app import create_app
    except ImportError as error:
        raise MissingExtra(f'serve needs {error.name or "the serve extra"}: pip install "qwen3next[serve]"') from None
    body_limit = MAX_BODY if max_body is None else as_flags(lambda: parse_size(max_body, "max_body"))
    if api_key is None and not _is_loopback(host):
        click.echo(f"qwen3next: warning: listening on {host} without --api-key: anyone who can reach this port "
                   "can use the model", err=True)
    model_id = served_model_name or _model_id(options["model_path"])

    with load_engine(options, quiet) as engine:
        engine.keep_prefix_states(prefix_states)
        app = create_app(engine, model_id, api_key, max_queue, body_limit, debug=ctx.obj.get("debug", False))
        click.echo(f"qwen3next: serving {model_id} at http://{_url_host(host)}:{port}/v1", err=True)
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5)


def _model_id(path: str | None) -> str:
    """What clients call the model: the hub id as given, else the folder's name."""
    if path is None:
        return DEMO_MODEL_ID
    if looks_like_repo_id(path) and not Path(path).expanduser().exists():
        return path
    return Path(path).expanduser().resolve().name


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
