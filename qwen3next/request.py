"""One generation request and its result, shared by the library, `run`, `run --jsonl` and the server.

Every caller builds the same validated `Request`, so a field means the same everywhere and an
error names the field (`RequestError.field`); the CLI turns field names into its flags, the
JSONL reader and the server report them as they are. A new option (a memory budget, the number
of speculative draft tokens) is one more field here and one more row in `_FIELDS`.

A streaming call yields `Token`s and ends with one `Result` for that call alone: its text, token
ids, finish reason, token counts and timings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Mapping

from .errors import RequestError
from .sampling import SAMPLING_FIELDS, SamplingParams

CHAT_ROLES = ("system", "user", "assistant", "tool")
PREFILL_CHUNK = 512  # prompt tokens per prefill step: bounds peak memory on long prompts
OFFLOAD_PREFILL_CHUNK = 4096  # when experts come from disk: each chunk reads nearly every expert once
MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class Request:
    """What to generate and how. Exactly one of `prompt` and `messages` is given.

    prompt: text, or token ids used as they are. messages: chat messages, always rendered with
    the model's chat template (as transformers' apply_chat_template renders them), `tools` with
    them. `chat` wraps a text prompt as one user message; `system` puts a system message first
    (and implies `chat`). Unset sampling fields (None) come from generation_config.json;
    temperature 0 is greedy. Generation stops at an eos id, at a stop string (not emitted),
    after max_new_tokens, or at the end of the context.
    """

    prompt: str | tuple[int, ...] | None = None
    messages: tuple[dict, ...] | None = None
    tools: tuple[dict, ...] | None = None
    system: str | None = None
    chat: bool = False
    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    prefill_chunk: int | None = None  # None: the engine's (PREFILL_CHUNK, larger when experts come from disk)
    speculative: int | None = None  # MTP draft tokens verified per step; 0 or None: off (docs/speculative.md)

    def __post_init__(self) -> None:
        # Lists arrive from Python and JSON; tuples keep the request hashable and immutable.
        for name in ("prompt", "messages", "tools"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        for name, check in _FIELDS.items():
            value = getattr(self, name)
            if value is not None:
                check(name, value)
        SamplingParams().updated(**self.sampling_overrides())  # ranges: one rule set, in sampling.py
        if (self.prompt is None) == (self.messages is None):
            raise RequestError("prompt", self.prompt, "give exactly one of prompt and messages")
        if self.tools is not None and self.messages is None and not self.chat and self.system is None:
            raise RequestError("tools", "...", "tools are rendered by the chat template: use messages or chat")
        if self.prompt is not None and not isinstance(self.prompt, str) and (self.chat or self.system is not None):
            raise RequestError("chat", self.chat, "chat and system apply to text prompts and message lists, "
                                                  "not to token ids")

    @classmethod
    def from_dict(cls, data: Any, defaults: Mapping[str, Any] | None = None) -> "Request":
        """A request from decoded JSON; unknown fields and wrong types are RequestErrors naming the field.

        `defaults` fill fields the data leaves out (the CLI's flags, for `run --jsonl`).
        """
        if not isinstance(data, dict):
            raise RequestError("request", data, "expected a JSON object")
        known = {f.name for f in fields(cls)}
        for name in data:
            if name not in known:
                raise RequestError(name, data[name], f"unknown field (known: {', '.join(sorted(known))})")
        given = {k: v for k, v in data.items() if v is not None}
        return cls(**{**(defaults or {}), **given})

    def as_dict(self) -> dict[str, Any]:
        """The set fields as JSON-ready values (what from_dict reads back)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def sampling_overrides(self) -> dict[str, Any]:
        """The sampling fields the request sets (the rest come from generation_config.json)."""
        return {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None}


def _integer(minimum: int, limit: int | None = None) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if type(value) is not int:
            raise RequestError(name, value, "must be an integer")
        if value < minimum or (limit is not None and value >= limit):
            raise RequestError(name, value, f"must be >= {minimum}" if limit is None else f"must be in [{minimum}, {limit})")
    return check


def _number(name: str, value: Any) -> None:
    if type(value) is bool or not isinstance(value, (int, float)):
        raise RequestError(name, value, "must be a number")
    if value != value or value in (float("inf"), float("-inf")):
        raise RequestError(name, value, "must be a finite number")


def _text(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise RequestError(name, value, "must be text")


def _flag(name: str, value: Any) -> None:
    if type(value) is not bool:
        raise RequestError(name, value, "must be true or false")


def _prompt(name: str, value: Any) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise RequestError(name, value, "the prompt is empty")
        return
    if not isinstance(value, tuple):
        raise RequestError(name, value, "must be text or a list of token ids")
    if not value:
        raise RequestError(name, [], "the prompt is empty")
    if not all(type(t) is int and t >= 0 for t in value):
        raise RequestError(name, "[...]", "token ids must be non-negative integers")


def _messages(name: str, value: Any) -> None:
    if not isinstance(value, tuple) or not value:
        raise RequestError(name, value, "must be a non-empty list of chat messages")
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise RequestError(where, message, 'must be an object with "role" and "content"')
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise RequestError(f"{where}.role", role, f"must be one of {', '.join(CHAT_ROLES)}")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise RequestError(f"{where}.content", content, "must be text")
        if content is None and not message.get("tool_calls"):
            raise RequestError(f"{where}.content", None, "is missing (only an assistant's tool calls may omit it)")


def _tools(name: str, value: Any) -> None:
    if not isinstance(value, tuple):
        raise RequestError(name, value, "must be a list of tools")
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or \
                tool.get("type", "function") != "function":
            raise RequestError(f"{name}[{i}]", tool, 'must be {"type": "function", "function": {"name": ..., ...}}')


def _stop(name: str, value: Any) -> None:
    if not isinstance(value, tuple) or not all(isinstance(s, str) for s in value):
        raise RequestError(name, value, "stop strings must be text")


_FIELDS: dict[str, Callable[[str, Any], None]] = {
    "prompt": _prompt,
    "messages": _messages,
    "tools": _tools,
    "system": _text,
    "chat": _flag,
    "max_new_tokens": _integer(0),
    "temperature": _number,
    "top_k": _integer(0),
    "top_p": _number,
    "min_p": _number,
    "repetition_penalty": _number,
    "seed": _integer(-(2**63), 2**64),  # what torch.Generator.manual_seed takes
    "stop": _stop,
    "prefill_chunk": _integer(1),
    "speculative": _integer(0),
}


@dataclass
class Token:
    """One generated token: its id and the text it completed ("" mid-character or mid-stop-string)."""

    token: int
    text: str


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose state was kept from an earlier call (Engine.keep_prefix_states)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def prefilled_tokens(self) -> int:
        """Prompt tokens this call ran through the model (kept tokens were not prefilled again)."""
        return self.prompt_tokens - self.cached_tokens


@dataclass
class Timings:
    prefill_seconds: float = 0.0  # the prompt, up to and including the first new token
    decode_seconds: float = 0.0  # every later token
    decode_steps: int = 0
    verify_steps: int = 0  # speculative decoding: main-model passes over the newest token and its drafts
    drafted: int = 0  # MTP draft tokens verified
    accepted: int = 0  # of them, those the main model agreed with
    drafted_by_position: list[int] = field(default_factory=list)  # [i]: verify steps with an (i+1)-th draft
    accepted_by_position: list[int] = field(default_factory=list)  # [i]: those whose (i+1)-th draft was accepted

    def count_verify(self, drafted: int, accepted: int) -> None:
        """One verify step over `drafted` drafts, of which the first `accepted` were accepted."""
        self.verify_steps += 1
        self.drafted += drafted
        self.accepted += accepted
        for counts, n in ((self.drafted_by_position, drafted), (self.accepted_by_position, accepted)):
            counts.extend([0] * (drafted - len(counts)))
            for i in range(n):
                counts[i] += 1

    def prefill_tokens_per_second(self, prompt_tokens: int) -> float:
        return prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_steps and self.decode_seconds else 0.0


@dataclass
class Result:
    """The outcome of one request: what `Engine.complete` returns and `Engine.stream` yields last."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop": an eos id or a stop string; "length": max_new_tokens or the context
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    experts: dict[str, float] | None = None  # the expert cache's counts for this call, when experts come from disk

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["usage"]["total_tokens"] = self.usage.total_tokens
        out["timings"]["prefill_tokens_per_second"] = self.timings.prefill_tokens_per_second(self.usage.prefilled_tokens)
        out["timings"]["decode_tokens_per_second"] = self.timings.decode_tokens_per_second
        return out
