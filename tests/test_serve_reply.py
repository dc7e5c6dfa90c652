"""The reply parser and the stream's chunks, without a server: tool calls, reasoning, content, held-back tags."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("starlette")

from qwen3next.request import Usage  # noqa: E402
from qwen3next.server.reply import ReplyParser, parse_tool_call  # noqa: E402
from qwen3next.server.responses import Answer  # noqa: E402

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bath"}}\n</tool_call>'


def parse(text: str, pieces_of: int = 0, **options) -> list[tuple[str, object]]:
    """Feed `text` whole (pieces_of 0) or in pieces of that many characters; merge neighbouring text pieces."""
    parser = ReplyParser(**options)
    steps = [text] if not pieces_of else [text[i: i + pieces_of] for i in range(0, len(text), pieces_of)]
    pieces = [piece for step in steps for piece in parser.feed(step)] + parser.finish()
    merged: list[tuple[str, object]] = []
    for piece in pieces:
        if piece.kind == "tool_call":
            merged.append(("tool_call", (piece.call.name, json.loads(piece.call.arguments))))
        elif merged and merged[-1][0] == piece.kind:
            merged[-1] = (piece.kind, merged[-1][1] + piece.text)
        else:
            merged.append((piece.kind, piece.text))
    return merged


@pytest.mark.parametrize("pieces_of", [0, 1, 3, 7])
def test_tool_calls_are_parsed_however_the_text_is_split(pieces_of):
    text = "Let me look that up.\n" + CALL + "\n" + CALL.replace("Bath", "Derby")
    assert parse(text, pieces_of, tools=True) == [
        ("content", "Let me look that up."),
        ("tool_call", ("get_weather", {"city": "Bath"})),
        ("tool_call", ("get_weather", {"city": "Derby"})),
    ]


@pytest.mark.parametrize("block", [
    "<tool_call>{not json}</tool_call>",
    '<tool_call>{"arguments": {}}</tool_call>',  # no name
    '<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>',  # arguments not an object
    '<tool_call>{"name": "f", "arguments": {"a": 1}}',  # never closed
])
def test_a_malformed_tool_call_is_plain_content(block):
    assert parse("Before " + block, 2, tools=True) == [("content", "Before " + block)]


def test_without_tools_the_tags_are_only_text():
    assert parse(CALL, 1) == [("content", CALL)]


def test_arguments_given_as_a_json_string_are_accepted():
    call = parse_tool_call('{"name": "f", "arguments": "{\\"a\\": 1}"}')
    assert call.name == "f" and json.loads(call.arguments) == {"a": 1} and call.id.startswith("call_")


@pytest.mark.parametrize("pieces_of", [0, 1, 4])
def test_reasoning_is_split_from_content(pieces_of):
    # the thinking template opens <think> in the prompt: the reply only closes it
    assert parse("\nWeighing it.\n</think>\n\nYes.", pieces_of, reasoning=True) == [
        ("reasoning", "\nWeighing it.\n"), ("content", "Yes.")]
    # a reply may also open the block itself
    assert parse("<think>Hm.</think>No.", pieces_of) == [("reasoning", "Hm."), ("content", "No.")]


def test_text_that_only_looks_like_the_start_of_a_tag_is_content_in_the_end():
    assert parse("a <tool_c", 1, tools=True) == [("content", "a <tool_c")]
    assert parse("<thi", 1) == [("content", "<thi")]
    assert parse("x < y and a <b>", 1, tools=True) == [("content", "x < y and a <b>")]


def test_plain_content_comes_through_unchanged():
    text = "  two leading spaces, a tab\tand a trailing newline\n"
    assert parse(text, 1) == [("content", text)] == parse(text, 0, tools=True)


def test_streamed_tool_call_deltas_assemble_into_the_whole_answer():
    parser = ReplyParser(tools=True)
    pieces = parser.feed("Checking. " + CALL[:20]) + parser.feed(CALL[20:]) + parser.finish()
    usage = Usage(prompt_tokens=5, completion_tokens=9)
    answer = Answer("m", chat=True, include_usage=True)
    chunks = [answer.role_chunk()] + [c for p in pieces for c in answer.piece_chunks(p)] + \
        answer.finish_chunks("tool_calls", usage)
    assert chunks[-1] == "data: [DONE]\n\n"
    events = [json.loads(c[len("data: "):]) for c in chunks[:-1]]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] == 14
    calls: dict[int, dict] = {}  # what a client does with the deltas
    content = ""
    for event in events[1:-1]:
        delta = event["choices"][0]["delta"]
        content += delta.get("content") or ""
        for part in delta.get("tool_calls", []):
            call = calls.setdefault(part["index"], {"id": None, "name": "", "arguments": ""})
            call["id"] = part.get("id", call["id"])
            call["name"] += part.get("function", {}).get("name", "")
            call["arguments"] += part.get("function", {}).get("arguments", "")
    whole = Answer("m", chat=True).whole(pieces, "tool_calls", usage)["choices"][0]["message"]
    assert content == whole["content"] == "Checking."
    assert [(c["id"], c["name"], c["arguments"]) for c in calls.values()] == \
        [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in whole["tool_calls"]]
    assert json.loads(calls[0]["arguments"]) == {"city": "Bath"}
