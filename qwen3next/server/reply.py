"""Qwen's reply format mapped to the API's: `<think>` reasoning, content, and `<tool_call>` blocks.

Qwen models write a tool call as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
and thinking models reason inside `<think>...</think>` (the thinking template opens the tag in
the prompt, so the reply may only close it). `ReplyParser` takes the text as it streams and
returns pieces as soon as they are certain: text that may be the start of a tag is held back.
A block that is not a well-formed call (bad JSON, no name, never closed) is returned as the
content it was, never an error: the model wrote it, the client should see it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object as text, as the API carries it


@dataclass
class Piece:
    kind: str  # "content", "reasoning" or "tool_call"
    text: str = ""
    call: ToolCall | None = None


class ReplyParser:
    """Feed text with `feed`, then `finish`; each returns the pieces that became certain.

    reasoning: the prompt opened a `<think>` block, so the reply starts inside it. tools: parse
    `<tool_call>` blocks (off when the request offered no tools: the text is then content).
    """

    def __init__(self, reasoning: bool = False, tools: bool = False):
        self._mode = "reasoning" if reasoning else "start"
        self._tools = tools
        self._pending = ""  # text not yet returned
        self._space = ""  # content whitespace held until more content follows
        self._strip_space = False  # drop whitespace where content starts after </think> or a tool call
        self.calls = 0

    def feed(self, text: str) -> list[Piece]:
        self._pending += text
        out: list[Piece] = []
        while self._step(out):
            pass
        return out

    def finish(self) -> list[Piece]:
        out: list[Piece] = []
        rest, self._pending = self._pending, ""
        if self._mode == "reasoning":
            out.append(Piece("reasoning", rest))
        else:
            self._content(CALL_OPEN + rest if self._mode == "call" else rest, out)  # an unclosed call is content
        if self._space and not self.calls:
            out.append(Piece("content", self._space))
        self._space = ""
        return [piece for piece in out if piece.text or piece.call]

    def _step(self, out: list[Piece]) -> bool:
        """Consume what the pending text settles; True when another step may settle more."""
        text = self._pending
        if self._mode == "start":  # does the reply open with <think>?
            stripped = text.lstrip()
            if THINK_OPEN.startswith(stripped):
                return False
            self._mode = "content"
            if stripped.startswith(THINK_OPEN):
                self._mode, self._pending = "reasoning", stripped[len(THINK_OPEN):]
            return True
        if self._mode == "reasoning":
            return self._until(THINK_CLOSE, out, "reasoning", "content")
        if self._mode == "content":
            if not self._tools:
                self._content(text, out)
                self._pending = ""
                return False
            return self._until(CALL_OPEN, out, "content", "call")
        end = text.find(CALL_CLOSE)  # inside a tool call: wait for the whole block
        if end < 0:
            return False
        block, self._pending, self._mode = text[:end], text[end + len(CALL_CLOSE):], "content"
        call = parse_tool_call(block)
        if call is None:
            self._content(CALL_OPEN + block + CALL_CLOSE, out)
        else:
            self._space, self._strip_space = "", True
            self.calls += 1
            out.append(Piece("tool_call", call=call))
        return True

    def _until(self, tag: str, out: list[Piece], kind: str, then: str) -> bool:
        """Return text of `kind` up to `tag` (holding back a possible start of it); past the tag, go on in `then`."""
        text = self._pending
        at = text.find(tag)
        if at < 0:
            keep = next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:k])), 0)
            self._emit(kind, text[: len(text) - keep], out)
            self._pending = text[len(text) - keep:]
            return False
        self._emit(kind, text[:at], out)
        self._pending, self._mode = text[at + len(tag):], then
        if kind == "reasoning":
            self._strip_space = True
        return True

    def _emit(self, kind: str, text: str, out: list[Piece]) -> None:
        if kind == "reasoning":
            if text:
                out.append(Piece("reasoning", text))
        else:
            self._content(text, out)

    def _content(self, text: str, out: list[Piece]) -> None:
        """Content; whitespace after </think> or a call is left out, and at the very end when there were calls."""
        if self._strip_space:
            text = text.lstrip()
            if not text:
                return
            self._strip_space = False
        text = self._space + text
        body = text.rstrip()
        self._space = text[len(body):]
        if body:
            out.append(Piece("content", body))


class PlainText:
    """A completion's reply: all of it content, exactly as generated (the ReplyParser interface)."""

    calls = 0

    def feed(self, text: str) -> list[Piece]:
        return [Piece("content", text)] if text else []

    def finish(self) -> list[Piece]:
        return []


def parse_tool_call(block: str) -> ToolCall | None:
    """The call in the text between `<tool_call>` and `</tool_call>`, or None when it is not one."""
    try:
        data = json.loads(block)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string already
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", data["name"], json.dumps(arguments, ensure_ascii=False))
