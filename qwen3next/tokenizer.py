"""The tokenizer and chat template, read from the checkpoint folder's own files.

tokenizer.json runs on the `tokenizers` library, the engine transformers uses, so ids match
the hub tokenizer exactly. The chat template is rendered the way transformers 5 renders it
(same jinja options, filter, globals and variables), so a prompt matches byte for byte what
the model was trained on. A template in a downloaded folder is untrusted code, so it runs in
jinja's immutable sandbox, and any way it fails becomes one TokenizerError line.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any, Iterable

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _Backend

from .errors import TokenizerError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves the template

# The named special tokens transformers passes to every template, when they are set.
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning may come under; transformers copies the first one set to both
# reasoning_content (what Qwen templates read) and thinking.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_REPLACEMENT_CHAR = "\ufffd"  # what decoding yields for an incomplete UTF-8 sequence


class Tokenizer:
    """Text <-> token ids, and chat messages -> prompt text, for one checkpoint folder."""

    def __init__(self, backend: _Backend, special_tokens: dict[str, str], templates: dict[str, str], template_source: str):
        self._backend = backend
        self._special_tokens = special_tokens
        self._templates = templates
        self._template_source = template_source
        self._compiled: dict[str, jinja2.Template] = {}
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        backend = _load_backend(folder / TOKENIZER_FILE)
        config_path = folder / CONFIG_FILE
        config = _read_config(config_path) if config_path.is_file() else {}
        special_tokens = {}
        for name in _SPECIAL_TOKEN_NAMES:
            text = _token_text(config.get(name), name, config_path)
            if text is not None:
                special_tokens[name] = text
        templates, source = _read_templates(folder, config)
        return cls(backend, special_tokens, templates, source)

    @property
    def eos_token(self) -> str | None:
        return self._special_tokens.get("eos_token")

    @property
    def bos_token(self) -> str | None:
        return self._special_tokens.get("bos_token")

    @property
    def pad_token(self) -> str | None:
        return self._special_tokens.get("pad_token")

    @property
    def has_chat_template(self) -> bool:
        return "default" in self._templates

    def encode(self, text: str) -> list[int]:
        # Qwen adds no BOS/EOS; added-token strings in the text become their ids.
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def detokenizer(self, skip_special_tokens: bool = True) -> StreamingDetokenizer:
        return StreamingDetokenizer(self, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
        """The prompt text for `messages`; `template_kwargs` (tools, documents, enable_thinking, ...)
        reach the template as variables, as in transformers' apply_chat_template(tokenize=False)."""
        tools = template_kwargs.pop("tools", None)
        documents = template_kwargs.pop("documents", None)
        template = self._template("tool_use" if tools is not None and "tool_use" in self._templates else "default")
        try:
            return template.render(
                messages=_template_messages(messages),
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **{**self._special_tokens, **template_kwargs},
            )
        except Exception as error:  # whatever the template does wrong, it is the template's failure
            raise self._template_error(error) from error

    def _template(self, name: str) -> jinja2.Template:
        if name not in self._compiled:
            if name not in self._templates:
                raise TokenizerError(f"{self._template_source}: no chat template (the checkpoint has {_describe(self._templates)})")
            try:
                self._compiled[name] = _environment().from_string(self._templates[name])
            except jinja2.TemplateSyntaxError as error:
                raise self._template_error(error) from error
        return self._compiled[name]

    def _template_error(self, error: Exception) -> TokenizerError:
        if isinstance(error, jinja2.TemplateSyntaxError):
            reason = f"syntax error on line {error.lineno}: {error.message}"
        elif isinstance(error, jinja2.exceptions.SecurityError):
            reason = f"blocked by the sandbox: {error}"
        elif isinstance(error, jinja2.TemplateError):
            reason = str(error)
        else:
            reason = f"{type(error).__name__}: {error}"
        reason = " ".join(reason.split())
        return TokenizerError(f"{self._template_source}: chat template failed: {reason}")


class StreamingDetokenizer:
    """Turns a stream of token ids into text pieces, never emitting half a UTF-8 character.

    A byte-level token can end inside a multi-byte character; decoding then ends in U+FFFD,
    so the text is held back until a later token completes it. Only a short window is
    decoded per token: the ids of the last emitted piece (as context) plus those not yet
    emitted, so the cost does not grow with the length of the stream.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._window: list[int] = []  # context ids, then ids not yet emitted
        self._context = 0  # how many ids at the start of the window are context
        self._context_text = ""
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._pieces)

    def add(self, token_id: int) -> str:
        """Returns the text `token_id` completes (possibly "")."""
        self._window.append(token_id)
        full = self._decode(self._window)
        if len(full) <= len(self._context_text) or full.endswith(_REPLACEMENT_CHAR):
            return ""
        return self._emit(full)

    def flush(self) -> str:
        """Whatever is left at the end of the stream, incomplete bytes decoded as U+FFFD."""
        piece = self._decode(self._window)[len(self._context_text) :]
        self._pieces.append(piece)
        self._window, self._context, self._context_text = [], 0, ""
        return piece

    def _emit(self, full: str) -> str:
        piece = full[len(self._context_text) :]
        self._pieces.append(piece)
        self._window = self._window[self._context :]
        self._context = len(self._window)
        self._context_text = self._decode(self._window)
        return piece

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)


def _load_backend(path: Path) -> _Backend:
    if not path.is_file():
        raise TokenizerError(f"{path}: not found (the checkpoint folder needs its tokenizer.json)")
    try:
        return _Backend.from_file(str(path))
    except Exception as error:  # the Rust loader raises plain Exception for any malformed file
        raise TokenizerError(f"{path}: unreadable: {' '.join(str(error).split())}") from error


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"{path}: unreadable: {error}") from error
    if not isinstance(config, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return config


def _token_text(value: Any, name: str, config_path: Path) -> str | None:
    """A special token as tokenizer_config.json spells it: a string, or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{config_path}: {name} must be a string or an object with a \"content\" string, got {value!r}")


def _read_templates(folder: Path, config: dict) -> tuple[dict[str, str], str]:
    """The chat templates by name, and the file they came from (for error messages)."""
    jinja_path = folder / TEMPLATE_FILE
    if jinja_path.is_file():
        return {"default": jinja_path.read_text(encoding="utf-8")}, str(jinja_path)
    source = str(folder / CONFIG_FILE)
    raw = config.get("chat_template")
    if raw is None:
        return {}, source
    if isinstance(raw, str):
        return {"default": raw}, source
    if isinstance(raw, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in raw
    ):
        return {t["name"]: t["template"] for t in raw}, source
    raise TokenizerError(f"{source}: chat_template must be a string or a list of {{\"name\", \"template\"}} objects")


def _describe(templates: dict[str, str]) -> str:
    return f"only {sorted(templates)}" if templates else "none"


def _template_messages(messages: list[dict]) -> list[dict]:
    """The messages as transformers hands them to a template: keys whose value is None are
    dropped (templates test for presence and would print "None"), and reasoning given under
    any of its names is copied to reasoning_content and thinking."""
    result = []
    for message in messages:
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        result.append(message)
    return result


@cache
def _environment() -> ImmutableSandboxedEnvironment:
    """jinja configured as transformers configures it for chat templates."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    # Unlike jinja's own tojson, no HTML escaping: '<' and '&' must reach the model as written.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict` for templates without the type object itself (no reaching its attributes)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict:
        return dict.fromkeys(*args)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's namespace(), refusing underscore names so a template cannot plant dunders on it."""

    def __init__(*args: Any, **kwargs: Any):  # jinja's signature trick, so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_namespace_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")
