"""Tokenizer: ids and text against transformers, streaming detokenization, chat template
parity with transformers' apply_chat_template, the sandbox, and every bad input."""

import json
import shutil

import pytest
from tokenizer_fixture import QWEN3_NEXT_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS, write_tokenizer_files

from qwen3next.errors import TokenizerError
from qwen3next.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world, the lighthouse keeper wrote in his log.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "café crème brûlée, naïve déjà vu",
    "東京の朝は静かです。我们明天去图书馆。",
    "emoji 🦙🚀 and 👩‍👩‍👧 family, flags 🇯🇵",
    "<think>\nhmm\n</think>\n\n<tool_call>\n{\"name\": \"f\"}\n</tool_call><|endoftext|>",
    "  spaces\t\ttabs\n\n\nnewlines  ",
    "She asked: \"Is it <b>bold</b> & 'quoted'?\"",
    "",
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city. Returns <b>HTML</b> & \"quotes\".",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich or 東京"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}

CONVERSATIONS = {
    "system_user": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Give me a short introduction to large language models."},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Why?"},
    ],
    "html_and_unicode": [
        {"role": "system", "content": "Antworte auf Deutsch. <b>fett</b> & \"zitiert\""},
        {"role": "user", "content": "Was ist <b>&\"'</b>? 東京 🦙 crème"},
    ],
    "tools": [
        {"role": "system", "content": "You can look things up."},
        {"role": "user", "content": "Weather in Zürich and 東京?"},
        {
            "role": "assistant",
            "content": None,  # dropped, as the OpenAI API sends it
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}},
                {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"東京\"}"}},
            ],
        },
        {"role": "tool", "content": "{\"temp\": 21, \"sky\": \"<sunny> & clear\"}"},
        {"role": "tool", "content": "{\"temp\": 25}"},
        {"role": "assistant", "content": "Zürich: 21 °C, 東京: 25 °C."},
        {"role": "user", "content": "Thanks! And tomorrow?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "content": "rain"},
    ],
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(path)
    return path


@pytest.fixture(scope="module")
def tok(folder):
    return Tokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def hf(folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def _folder_with_template(tmp_path, template):
    write_tokenizer_files(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(template, encoding="utf-8")
    return tmp_path


# --- the fixture -----------------------------------------------------------------------


def test_fixture_is_deterministic_and_counts_ids(tmp_path, tok):
    counts = [write_tokenizer_files(tmp_path / name) for name in ("a", "b")]
    assert counts[0] == counts[1] == tok.vocab_size
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert len(QWEN_SPECIAL_TOKENS) == 26
    assert [tok.token_id(t) for t in QWEN_SPECIAL_TOKENS] == list(range(tok.vocab_size - 26, tok.vocab_size))


# --- ids and text ----------------------------------------------------------------------


def test_special_tokens_and_ids(tok):
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    assert tok.has_chat_template
    assert tok.token_id("<|im_end|>") == tok.encode("<|im_end|>")[0]
    assert tok.token_id("no such token") is None


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_token_strings_map_to_their_ids(tok):
    ids = tok.encode("a<|im_start|>b<think>")
    assert tok.token_id("<|im_start|>") in ids and tok.token_id("<think>") in ids
    assert tok.encode("<|im_end|>") == [tok.token_id("<|im_end|>")]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(tok, hf, text):
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_skip_special_tokens_keeps_non_special_added_tokens(tok):
    ids = tok.encode("<|im_start|>x<think>y</think><|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "x<think>y</think>"


# --- streaming detokenizer -------------------------------------------------------------


def _stream(tok, ids, skip):
    det = tok.detokenizer(skip_special_tokens=skip)
    pieces = [det.add(i) for i in ids]
    pieces.append(det.flush())
    return det, pieces


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_stream_concatenates_to_decode(tok, text, skip):
    ids = tok.encode(text)
    det, pieces = _stream(tok, ids, skip)
    assert "".join(pieces) == det.text == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in p for p in pieces)


def test_stream_holds_back_split_characters(tok):
    ids = tok.encode("🦙")
    assert len(ids) > 1 and tok.decode(ids[:1]) == "\ufffd"  # the emoji really is split across tokens
    det = tok.detokenizer()
    assert [det.add(i) for i in ids] == [""] * (len(ids) - 1) + ["🦙"]
    assert det.flush() == ""


def test_stream_flush_replaces_incomplete_bytes(tok):
    ids = tok.encode("ok 🦙")[:-1]
    det, pieces = _stream(tok, ids, True)
    assert pieces[-1].endswith("\ufffd")
    assert det.text == tok.decode(ids)


def test_stream_decodes_a_short_window(tok, monkeypatch):
    ids = tok.encode(" ".join(TEXTS) * 20)
    lengths = []
    decode = tok.decode

    def spy(window, skip_special_tokens=False):
        lengths.append(len(window))
        return decode(window, skip_special_tokens)

    monkeypatch.setattr(tok, "decode", spy)
    det, _ = _stream(tok, ids, True)
    monkeypatch.undo()
    assert det.text == tok.decode(ids, skip_special_tokens=True)
    assert len(ids) > 500 and max(lengths) <= 12


# --- chat template parity --------------------------------------------------------------


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_matches_transformers(tok, hf, name, generation_prompt):
    messages = CONVERSATIONS[name]
    tools = [WEATHER_TOOL] if name == "tools" else None
    want = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)
    got = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tools=tools)
    assert got == want


def test_tools_json_is_not_html_escaped(tok):
    prompt = tok.apply_chat_template(CONVERSATIONS["tools"], tools=[WEATHER_TOOL])
    assert json.dumps(WEATHER_TOOL, ensure_ascii=False) in prompt
    assert '{"city": "Zürich", "unit": "celsius"}' in prompt
    assert "\\u003c" not in prompt and "&lt;" not in prompt


# Exercises what the Qwen3-Next template itself does not: namespace, loop controls,
# raise_exception (not raised), tojson arguments, dict(), extra kwargs, reasoning aliases
# and the special-token variables.
FEATURE_TEMPLATE = """{%- set ns = namespace(count=0, last_user=-1) %}
{%- for m in messages %}
    {%- if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}
{%- endfor %}
{%- for m in messages %}
    {%- if m.role == 'skip' %}{% continue %}{% endif %}
    {%- if m.role == 'stop' %}{% break %}{% endif %}
    {%- set ns.count = ns.count + 1 %}
    {%- if m.role not in ['system', 'user', 'assistant', 'tool'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}
<{{ m.role }}{{ '*' if loop.index0 == ns.last_user }}>{{ m.content | default('') }}
    {%- if m.reasoning_content is defined %} [r={{ m.reasoning_content }} t={{ m.thinking }}]{% endif %}
    {%- if m.tool_calls is defined %} calls={{ m.tool_calls | tojson(indent=2, sort_keys=true) }}{% endif %}
{% endfor %}
n={{ ns.count }} think={{ enable_thinking | default('unset') }} tools={{ tools | tojson(separators=[',', ':']) }}
docs={{ documents | tojson }} d={{ dict(a=1, b='<&>') | tojson }}
bos={{ bos_token | default('none') }} eos={{ eos_token }} pad={{ pad_token }} unk={{ unk_token | default('none') }}
{%- if add_generation_prompt %}
GO
{%- endif %}"""

FEATURE_MESSAGES = [
    {"role": "system", "content": "sys <b>"},
    {"role": "user", "content": "first"},
    {"role": "skip", "content": "never shown"},
    {"role": "assistant", "content": "ok", "reasoning": "because"},
    {"role": "assistant", "content": None, "thinking": "hmm", "tool_calls": [{"function": {"name": "f", "arguments": {"z": 1, "a": "東京"}}}]},
    {"role": "user", "content": "second"},
    {"role": "stop", "content": "end here"},
    {"role": "user", "content": "never reached"},
]


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"enable_thinking": False}, {"enable_thinking": True, "tools": [WEATHER_TOOL], "documents": [{"title": "t", "text": "x"}]}],
)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_template_features_match_transformers(tmp_path, hf, kwargs, generation_prompt):
    tok = Tokenizer.from_folder(_folder_with_template(tmp_path, FEATURE_TEMPLATE))
    want = hf.apply_chat_template(
        FEATURE_MESSAGES, chat_template=FEATURE_TEMPLATE, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
    )
    got = tok.apply_chat_template(FEATURE_MESSAGES, add_generation_prompt=generation_prompt, **kwargs)
    assert got == want
    assert "never" not in got and "[r=because t=because]" in got and "[r=hmm t=hmm]" in got


def test_template_list_picks_default_or_tool_use(tmp_path):
    write_tokenizer_files(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "TOOLS {{ tools | length }}"},
        {"name": "default", "template": "PLAIN {{ messages | length }}"},
    ]
    config_path.write_text(json.dumps(config))
    tok = Tokenizer.from_folder(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == "PLAIN 1" == hf.apply_chat_template(messages, tokenize=False)
    with_tools = hf.apply_chat_template(messages, tools=[WEATHER_TOOL], tokenize=False)
    assert tok.apply_chat_template(messages, tools=[WEATHER_TOOL]) == "TOOLS 1" == with_tools


def test_chat_template_jinja_wins_and_special_tokens_may_be_dicts(tmp_path):
    folder = _folder_with_template(tmp_path, "{{ eos_token }}|{{ messages[0].content }}")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token"] = {"__type": "AddedToken", "content": "<|endoftext|>", "special": True}
    config_path.write_text(json.dumps(config))
    tok = Tokenizer.from_folder(folder)
    assert tok.eos_token == "<|endoftext|>"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|endoftext|>|x"


def test_fixture_template_is_the_qwen_template(tok):
    assert "tojson" in QWEN3_NEXT_CHAT_TEMPLATE
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# --- the sandbox and template errors ---------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ messages.__class__.__base__ }}",
        "{% set ns = namespace() %}{% set ns._x = 1 %}",
        "{{ messages.append(1) }}",
    ],
)
def test_sandbox_blocks_escapes(tmp_path, template):
    tok = Tokenizer.from_folder(_folder_with_template(tmp_path, template))
    with pytest.raises(TokenizerError, match="chat_template.jinja: chat template failed: blocked by the sandbox"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_raise_exception_message_reaches_the_error(tmp_path):
    tok = Tokenizer.from_folder(_folder_with_template(tmp_path, "{{ raise_exception('x marks\nthe spot') }}"))
    with pytest.raises(TokenizerError) as info:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    message = str(info.value)
    assert "x marks the spot" in message and str(tmp_path / "chat_template.jinja") in message and "\n" not in message


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("{% for m in messages %}{{ m.content }}", "syntax error on line 1"),
        ("{{ nothing.here }}", "'nothing' is undefined"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ],
)
def test_template_failures_become_tokenizer_errors(tmp_path, template, reason):
    tok = Tokenizer.from_folder(_folder_with_template(tmp_path, template))
    with pytest.raises(TokenizerError, match=reason):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_errors_name_the_config_file_when_the_template_lives_there(tmp_path):
    write_tokenizer_files(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = "{% if %}"
    config_path.write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="tokenizer_config.json: chat template failed: syntax error"):
        Tokenizer.from_folder(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])


# --- bad folders -----------------------------------------------------------------------


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json: not found") as info:
        Tokenizer.from_folder(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value)


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(TokenizerError, match="tokenizer.json: unreadable"):
        Tokenizer.from_folder(tmp_path)


def test_corrupt_tokenizer_config(tmp_path):
    write_tokenizer_files(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: unreadable"):
        Tokenizer.from_folder(tmp_path)


def test_bad_special_token_entry(tmp_path):
    write_tokenizer_files(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token"] = 7
    config_path.write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="eos_token"):
        Tokenizer.from_folder(tmp_path)


def test_no_chat_template(tmp_path, folder):
    shutil.copy(folder / "tokenizer.json", tmp_path / "tokenizer.json")  # no tokenizer_config.json at all
    tok = Tokenizer.from_folder(tmp_path)
    assert not tok.has_chat_template and tok.eos_token is None
    assert tok.encode("hello") == Tokenizer.from_folder(folder).encode("hello")
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
