"""The HTTP side: endpoints, API key, body limit, access log, errors (Starlette; uvicorn runs it).

`create_app(engine, model_id, ...)` returns the ASGI app. GET /health (never behind the key),
GET /v1/models (and /v1/models/ID), POST /v1/chat/completions, POST /v1/completions. Every error is OpenAI-shaped JSON
with its status; anything unexpected is a one-line 500 (the traceback only with debug), and the
server goes on serving. The access log names the client, route, status, time and token counts,
never the prompt or the reply.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
from contextlib import asynccontextmanager
from typing import Callable

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qwen3next.errors import Qwen3NextError
from qwen3next.request import Result, Token
from qwen3next.server import MAX_BODY, MAX_QUEUE
from qwen3next.server.api import Call, chat_call, completion_call, prepare
from qwen3next.server.errors import APIError, from_library
from qwen3next.server.reply import Piece, PlainText, ReplyParser
from qwen3next.server.responses import DONE, Answer, finish_reason, model_object, sse
from qwen3next.server.scheduler import Job, QueueFull, Scheduler

RETRY_AFTER_SECONDS = 5
_OUTCOME = "qwen3next.outcome"  # the scope key where a generation leaves its figures for the access log
_DISCONNECT_POLL_SECONDS = 0.25


def create_app(engine, model_id: str, api_key: str | None = None, max_queue: int = MAX_QUEUE,
               max_body: int = MAX_BODY, log: Callable[[str], None] | None = None, debug: bool = False) -> Starlette:
    """The server for `engine`, which must already keep its prefix states if it is to (Engine.keep_prefix_states)."""
    service = _Service(engine, model_id, Scheduler(engine, max_queue), max_body)

    @asynccontextmanager
    async def lifespan(app):
        service.scheduler.start()
        try:
            yield
        finally:
            service.scheduler.close()

    routes = [
        Route("/health", service.health, methods=["GET"]),
        Route("/v1/models", service.models, methods=["GET"]),
        Route("/v1/models/{model:path}", service.model, methods=["GET"]),
        Route("/v1/chat/completions", service.chat, methods=["POST"]),
        Route("/v1/completions", service.completions, methods=["POST"]),
    ]
    handlers = {APIError: _error_response, HTTPException: _http_error}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.add_middleware(_ApiKey, key=api_key)
    app.add_middleware(_AccessLog, log=log or _stderr, debug=debug)  # added last: the outermost
    return app


class _Service:
    def __init__(self, engine, model_id: str, scheduler: Scheduler, max_body: int):
        self.engine, self.model_id, self.scheduler, self.max_body = engine, model_id, scheduler, max_body
        self.created = int(time.time())

    async def health(self, request: HTTPRequest) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_id, "running": self.scheduler.running,
                             "waiting": self.scheduler.waiting})

    async def models(self, request: HTTPRequest) -> Response:
        return JSONResponse({"object": "list", "data": [model_object(self.model_id, self.created)]})

    async def model(self, request: HTTPRequest) -> Response:
        name = request.path_params["model"]
        if name != self.model_id:
            raise APIError(404, f"model: {name!r} is not served here (this server serves {self.model_id!r})",
                           param="model", code="model_not_found")
        return JSONResponse(model_object(self.model_id, self.created))

    async def chat(self, request: HTTPRequest) -> Response:
        return await self._generate(request, chat_call(await _read_json(request, self.max_body), self.model_id))

    async def completions(self, request: HTTPRequest) -> Response:
        return await self._generate(request, completion_call(await _read_json(request, self.max_body), self.model_id))

    async def _generate(self, request: HTTPRequest, call: Call) -> Response:
        prepared, reasoning = prepare(self.engine, call)
        try:
            job = self.scheduler.submit(prepared)
        except QueueFull:
            raise APIError(503, f"the server is busy ({self.scheduler.waiting} requests are waiting); retry later",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        outcome = request.scope.setdefault(_OUTCOME, {})
        answer = Answer(self.model_id, call.chat, call.include_usage)
        parser = ReplyParser(reasoning, call.tools) if call.chat else PlainText()
        if call.stream:
            events = _stream(job, answer, parser, outcome, call.prompt_field)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        collecting = asyncio.ensure_future(_collect(job, parser, outcome))
        while not (await asyncio.wait({collecting}, timeout=_DISCONNECT_POLL_SECONDS))[0]:
            if await request.is_disconnected():
                job.cancel()
                outcome["finish"] = "cancelled"
                return Response(status_code=204)  # nobody reads it
        try:
            pieces, result, calls = collecting.result()
        except Qwen3NextError as error:
            raise from_library(error, call.prompt_field) from None
        reason = finish_reason(result.finish_reason, calls)
        outcome.update(usage=result.usage, finish=reason)
        return JSONResponse(answer.whole(pieces, reason, result.usage))


async def _collect(job: Job, parser: ReplyParser | PlainText, outcome: dict) -> tuple[list[Piece], Result, int]:
    pieces: list[Piece] = []
    async for event in job.events():
        if isinstance(event, Token):
            outcome["tokens"] = outcome.get("tokens", 0) + 1
            pieces += parser.feed(event.text)
        else:
            return pieces + parser.finish(), event, parser.calls
    raise APIError(500, "the generation ended without a result")


async def _stream(job: Job, answer: Answer, parser: ReplyParser | PlainText, outcome: dict, prompt_field: str):
    """The SSE body. Leaving early (the client went away) cancels the job at its next token."""
    outcome["finish"] = "cancelled"
    try:
        if answer.chat:
            yield answer.role_chunk()
        async for event in job.events():
            if isinstance(event, Token):
                outcome["tokens"] = outcome.get("tokens", 0) + 1
            pieces = parser.feed(event.text) if isinstance(event, Token) else parser.finish()
            for piece in pieces:
                for chunk in answer.piece_chunks(piece):
                    yield chunk
            if isinstance(event, Result):
                reason = finish_reason(event.finish_reason, parser.calls)
                outcome.update(usage=event.usage, finish=reason)
                for chunk in answer.finish_chunks(reason, event.usage):
                    yield chunk
    except Qwen3NextError as error:  # after the 200 went out: the error as the stream's last event
        outcome["finish"] = "error"
        yield sse(from_library(error, prompt_field).body())
        yield DONE
    finally:
        job.cancel()  # nothing to stop when it finished


async def _read_json(request: HTTPRequest, limit: int):
    """The body as JSON, refused with 413 once it passes `limit` bytes (declared or received)."""
    too_large = APIError(413, f"the request body is larger than the server's limit of {limit} bytes",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except ValueError as error:
        raise APIError(400, f"the body is not valid JSON ({error})") from None


def _error_response(request, error: APIError) -> Response:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _http_error(request, error: HTTPException) -> Response:
    message = {404: f"no such endpoint: {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code, str(error.detail))
    return _error_response(request, APIError(error.status_code, message, headers=error.headers))


class _ApiKey:
    """With a key, every request but GET /health needs `Authorization: Bearer KEY` (compared in constant time)."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, None if key is None else key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.key is not None and scope["path"] != "/health":
            scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.key):
                error = APIError(401, "a valid API key is needed (Authorization: Bearer KEY)", code="invalid_api_key",
                                 headers={"WWW-Authenticate": "Bearer"})
                await _error_response(None, error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _AccessLog:
    """One line per request on stderr; an unexpected exception becomes a one-line 500 here."""

    def __init__(self, app, log: Callable[[str], None], debug: bool):
        self.app, self.log, self.debug = app, log, debug

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status, problem = time.perf_counter(), [0], ""

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as error:
            if self.debug:
                raise
            problem = f" internal error: {type(error).__name__}: {error}"
            if not status[0]:
                await _error_response(None, APIError(500, problem.strip()))(scope, receive, sending)
        finally:
            client = scope.get("client") or ("-", 0)
            line = f'{client[0]}:{client[1]} "{scope["method"]} {scope["path"]}" {status[0] or 500} ' \
                   f"{time.perf_counter() - started:.2f}s"
            outcome = scope.get(_OUTCOME, {})
            usage = outcome.get("usage")
            if usage is not None:
                line += f" prompt={usage.prompt_tokens} cached={usage.cached_tokens} " \
                        f"completion={usage.completion_tokens}"
            elif "tokens" in outcome:  # cut short: what was generated before
                line += f" completion={outcome['tokens']}"
            if "finish" in outcome:
                line += f" finish={outcome['finish']}"
            self.log(line + problem)


def _stderr(line: str) -> None:
    print(f"qwen3next: {line}", file=sys.stderr, flush=True)
