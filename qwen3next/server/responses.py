"""OpenAI response objects and stream chunks, built from the engine's Result and the reply's pieces.

A chat stream is: a chunk with the assistant role, chunks with content / reasoning_content /
tool-call deltas, one with the finish reason, then (with stream_options.include_usage) one with
the usage and no choices, then `data: [DONE]`. A tool call streams as two deltas: its id and name
with empty arguments, then the arguments. The non-streamed answer holds the same pieces joined.
"""

from __future__ import annotations

import json
import time
import uuid

from qwen3next.request import Usage
from qwen3next.server.reply import Piece

DONE = "data: [DONE]\n\n"


class Answer:
    """Ids and the common fields of one answer (chat or completion), and its chunks."""

    def __init__(self, model_id: str, chat: bool, include_usage: bool = False):
        self.chat, self.model_id, self.include_usage = chat, model_id, include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.calls = 0  # tool calls streamed so far: each delta names its index

    def _object(self, kind: str, choices: list, usage: Usage | None = None, final: bool = False) -> dict:
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model_id, "choices": choices}
        if usage is not None or final:
            out["usage"] = None if usage is None else usage_object(usage)
        return out

    def chunk(self, choice: dict) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        choice = {"index": 0, "logprobs": None, "finish_reason": None, **choice}
        return sse(self._object(kind, [choice], final=self.include_usage))

    def role_chunk(self) -> str:
        return self.chunk({"delta": {"role": "assistant", "content": ""}})

    def piece_chunks(self, piece: Piece) -> list[str]:
        """The chunks for one piece of the reply."""
        if not self.chat:
            return [self.chunk({"text": piece.text})]
        if piece.kind == "content":
            return [self.chunk({"delta": {"content": piece.text}})]
        if piece.kind == "reasoning":
            return [self.chunk({"delta": {"reasoning_content": piece.text}})]
        index, self.calls = self.calls, self.calls + 1
        call = piece.call
        head = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        return [self.chunk({"delta": {"tool_calls": [head]}}),
                self.chunk({"delta": {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}})]

    def finish_chunks(self, finish_reason: str, usage: Usage) -> list[str]:
        last = {"delta": {}} if self.chat else {"text": ""}
        chunks = [self.chunk({**last, "finish_reason": finish_reason})]
        if self.include_usage:
            kind = "chat.completion.chunk" if self.chat else "text_completion"
            chunks.append(sse(self._object(kind, [], usage)))
        return chunks + [DONE]

    def whole(self, pieces: list[Piece], finish_reason: str, usage: Usage) -> dict:
        """The non-streamed answer."""
        content = "".join(p.text for p in pieces if p.kind == "content")
        if not self.chat:
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish_reason}
            return self._object("text_completion", [choice], usage)
        message = {"role": "assistant", "content": content}
        reasoning = "".join(p.text for p in pieces if p.kind == "reasoning")
        if reasoning:
            message["reasoning_content"] = reasoning
        calls = [p.call for p in pieces if p.kind == "tool_call"]
        if calls:
            message["content"] = content or None
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        return self._object("chat.completion", [choice], usage)


def finish_reason(result_reason: str, tool_calls: int) -> str:
    """The API's finish reason: "tool_calls" when the reply called tools, else the engine's (stop, length)."""
    return "tool_calls" if tool_calls else result_reason


def usage_object(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def model_object(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "qwen3next"}
