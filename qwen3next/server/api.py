"""OpenAI request bodies checked and turned into the library's Request.

Every field of a body is one of: mapped to a Request field (checked there, once, so it means what
it means in `run` and `--jsonl`); accepted and ignored, because it cannot change the output
(`user`, `metadata`, ...); or refused with a 400 naming it, because it would change the output
and is not implemented (`logprobs`, `n` > 1, `response_format`, penalties we do not have). A field
the endpoint does not know is refused too. This module adds only the API's own rules: `max_tokens`
>= 1, `temperature` <= 2, the served model's name, and the context left after the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from qwen3next.errors import Qwen3NextError
from qwen3next.request import Request
from qwen3next.server.errors import APIError, from_library
from qwen3next.server.reply import THINK_OPEN

COMPLETION_MAX_TOKENS = 16  # the legacy completions endpoint's default, as OpenAI's
MAX_TEMPERATURE = 2.0  # the API's range; the library takes any temperature >= 0

_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")  # Request's names too
_IGNORED = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier")
# Fields we do not implement, and the values with which they change nothing.
_INERT = {
    "n": (1,), "logprobs": (False, 0), "top_logprobs": (0,), "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0), "logit_bias": ({},), "response_format": ({"type": "text"},),
    "parallel_tool_calls": (True,), "echo": (False,), "best_of": (1,), "suffix": ("",),
}
_COMMON = {"model", "stream", "stream_options", "stop", "max_tokens", *_SAMPLING, *_IGNORED}
_CHAT_FIELDS = _COMMON | {"messages", "tools", "tool_choice", "max_completion_tokens", "n", "logprobs",
                          "top_logprobs", "frequency_penalty", "presence_penalty", "logit_bias", "response_format",
                          "parallel_tool_calls"}
_COMPLETION_FIELDS = _COMMON | {"prompt", "n", "logprobs", "frequency_penalty", "presence_penalty", "logit_bias",
                                "echo", "best_of", "suffix"}


@dataclass(frozen=True)
class Call:
    """A checked body: the Request (prompt not yet tokenized) and how to answer it."""

    request: Request
    chat: bool
    stream: bool
    include_usage: bool
    max_tokens: int | None  # None: the endpoint's default
    max_tokens_field: str
    tools: bool  # parse tool calls out of the reply

    @property
    def prompt_field(self) -> str:
        return "messages" if self.chat else "prompt"


def chat_call(body: Any, model_id: str) -> Call:
    """A /v1/chat/completions body as a Call."""
    body = _fields(body, _CHAT_FIELDS, model_id)
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise APIError(400, 'tool_choice: only "auto" and "none" are supported (forcing a call needs constrained '
                       "decoding, which this server does not do)", param="tool_choice")
    tools = body.get("tools") if choice != "none" else None
    if body.get("messages") is None:
        raise APIError(400, "messages: is missing", param="messages")
    messages = _messages(body["messages"])
    request = _request(body, "messages", messages=messages, tools=tools or None)
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return _call(body, request, True, field, tools=bool(tools))


def completion_call(body: Any, model_id: str) -> Call:
    """A /v1/completions body as a Call."""
    body = _fields(body, _COMPLETION_FIELDS, model_id)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and not all(type(t) is int for t in prompt):
        raise APIError(400, "prompt: one prompt per request (text or token ids); batches are not supported",
                       param="prompt")
    if prompt is None:
        raise APIError(400, "prompt: is missing", param="prompt")
    return _call(body, _request(body, "prompt", prompt=prompt), False, "max_tokens", tools=False)


def prepare(engine, call: Call) -> tuple[Request, bool]:
    """The Request as the engine runs it (prompt as token ids, max_new_tokens set from what the context
    leaves) and whether the prompt opened a <think> block. Template and context errors are 400s."""
    try:
        ids = engine.prompt_ids(call.request)
    except Qwen3NextError as error:
        raise from_library(error, call.prompt_field) from None
    prompt, context = len(ids), engine.context_length
    if prompt >= context:
        raise APIError(400, f"{call.prompt_field}: the prompt is {prompt} tokens and the model's context is {context} "
                       "tokens, which leaves no room to generate", param=call.prompt_field,
                       code="context_length_exceeded")
    room = context - prompt
    wanted = call.max_tokens
    if wanted is not None and wanted > room:
        raise APIError(400, f"{call.max_tokens_field}: {wanted} tokens asked for, but the model's context of {context} "
                       f"tokens leaves {room} after the prompt's {prompt}", param=call.max_tokens_field,
                       code="context_length_exceeded")
    if wanted is None:
        wanted = room if call.chat else min(COMPLETION_MAX_TOKENS, room)
    think = engine.tokenizer.token_id(THINK_OPEN)
    request = replace(call.request, prompt=tuple(ids), messages=None, tools=None, max_new_tokens=wanted)
    return request, call.chat and think is not None and think in ids[-2:]


def _fields(body: Any, known: set[str], model_id: str) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    for name, value in body.items():
        if name not in known:
            raise APIError(400, f"{name}: not a field this endpoint accepts", param=name)
        inert = _INERT.get(name)
        if inert and value is not None and not any(type(value) is type(ok) and value == ok for ok in inert):
            raise APIError(400, f"{name}: {value!r} is not supported (only {inert[0]!r})", param=name)
    model = body.get("model")
    if model is not None and model != model_id:
        raise APIError(404, f"model: {model!r} is not served here (this server serves {model_id!r})", param="model",
                       code="model_not_found")
    return body


def _messages(value: Any) -> Any:
    """Messages as the chat template takes them: text content parts joined, "developer" read as "system"."""
    if not isinstance(value, list):
        return value  # Request names what is wrong with it
    out = []
    for i, message in enumerate(value):
        if isinstance(message, dict):
            if isinstance(message.get("content"), list):
                message = {**message, "content": _text_parts(message["content"], f"messages[{i}].content")}
            if message.get("role") == "developer":
                message = {**message, "role": "system"}
        out.append(message)
    return out


def _text_parts(parts: list, where: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}[{j}]: only text parts are supported", param=f"{where}[{j}]")
        texts.append(part["text"])
    return "".join(texts)


def _request(body: dict, prompt_field: str, **prompt) -> Request:
    sampling = {name: body[name] for name in _SAMPLING if body.get(name) is not None}
    try:
        request = Request(**prompt, **sampling, stop=_stop(body.get("stop")))
    except Qwen3NextError as error:
        raise from_library(error, prompt_field) from None
    if request.temperature is not None and request.temperature > MAX_TEMPERATURE:
        raise APIError(400, f"temperature: must be in [0, {MAX_TEMPERATURE:g}] (got {request.temperature})",
                       param="temperature")
    return request


def _stop(value: Any) -> Any:
    if value is None:
        return ()
    if isinstance(value, (str, list)):
        return value
    raise APIError(400, "stop: must be text or a list of texts", param="stop")


def _call(body: dict, request: Request, chat: bool, field: str, tools: bool) -> Call:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if type(stream) is not bool:
        raise APIError(400, "stream: must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or type(options.get("include_usage", False)) is not bool:
        raise APIError(400, 'stream_options: must be an object like {"include_usage": true}', param="stream_options")
    wanted = body.get(field)
    if wanted is not None and (type(wanted) is not int or wanted < 1):
        raise APIError(400, f"{field}: must be an integer >= 1 (got {wanted!r})", param=field)
    return Call(request, chat, stream, bool(options.get("include_usage")), wanted, field, tools)
