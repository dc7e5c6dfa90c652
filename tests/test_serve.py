"""`qwen3next serve` as clients see it: a real server on 127.0.0.1 driven by the official openai client.

One server process per module (the demo model in fp32, so reused chat turns match a fresh prefill to
the bit), compared with the same model loaded here. Tool calls, reasoning, the API key and a chat
template that fails are checked on a second, in-process server whose engine plays scripted replies
(the demo model would not call a tool by itself) and whose template refuses a conversation that opens
with an assistant message, as many real templates do.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

import httpx2  # noqa: E402

import qwen3next  # noqa: E402
from qwen3next import Request, Result, Token  # noqa: E402
from qwen3next.model_path import DEMO_MODEL  # noqa: E402
from qwen3next.request import Usage  # noqa: E402
from qwen3next.server.app import create_app  # noqa: E402

MODEL = "qwen3next-demo"
README = Path(__file__).resolve().parent.parent / "README.md"
MAX_BODY = 64 * 1024
USER = [{"role": "user", "content": "Tell me about Elizabeth."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Server:
    """A `qwen3next serve` subprocess; its stderr (the access log) goes to a file."""

    def __init__(self, tmp: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "serve.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qwen3next", "serve", "--port", str(self.port), "-q", *args],
            stdout=subprocess.DEVNULL, stderr=self.log.open("w"))
        wait_until(self._up, 180, "the server to answer /health")

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the server exited ({self.process.returncode}): {self.log.read_text()}")
        try:
            return httpx2.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx2.TransportError:
            return False

    def health(self) -> dict:
        return httpx2.get(f"{self.url}/health", timeout=5).json()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"), "--dtype", "float32", "--max-queue", "1", "--max-body", str(MAX_BODY))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         http_client=httpx2.Client(trust_env=False, timeout=120))


@pytest.fixture(scope="module")
def engine():
    """The same model in this process: what the server's answers are compared with (a fresh prefill each call)."""
    return qwen3next.load(dtype="float32", quiet=True)


def chat(client, messages=USER, **fields):
    return client.chat.completions.create(model=MODEL, messages=messages, **fields)


def post(server, path: str, body, **kwargs) -> httpx2.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx2.post(f"{server.url}{path}", content=content, headers={"Content-Type": "application/json"},
                       timeout=60, **kwargs)


def sse_events(response: httpx2.Response) -> list:
    lines = [line for line in response.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


# --- the endpoints

def test_health_and_models(server, client):
    assert server.health() == {"status": "ok", "model": MODEL, "running": 0, "waiting": 0}
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_answers_what_the_library_generates(client, engine):
    answer = chat(client, max_tokens=12, temperature=0)
    expected = engine.complete(Request(messages=USER, max_new_tokens=12, temperature=0))
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == "length" and answer.model == MODEL and answer.id.startswith("chatcmpl-")
    assert answer.usage.prompt_tokens == len(engine.prompt_ids(Request(messages=USER)))
    assert answer.usage.completion_tokens == 12 and answer.usage.total_tokens == answer.usage.prompt_tokens + 12


def test_chat_stream_role_first_then_content_finish_usage_and_done(server, client):
    whole = chat(client, max_tokens=10, temperature=0)
    body = {"model": MODEL, "messages": USER, "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = whole.choices[0].message.content
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1]) == text
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-2]["choices"][0]["delta"] == {}
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 10
    streamed = list(chat(client, max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text
    assert all(c.usage is None for c in streamed)  # usage only when asked for


def test_completions_text_and_token_ids_streamed_and_not(client, engine):
    prompt = "It is a truth universally acknowledged"
    expected = engine.complete(Request(prompt=prompt, max_new_tokens=8, temperature=0))
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert answer.choices[0].text == expected.text and answer.usage.completion_tokens == 8
    by_ids = client.completions.create(model=MODEL, prompt=engine.tokenizer.encode(prompt), max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == expected.text
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"
    default = client.completions.create(model=MODEL, prompt=prompt, temperature=0)
    assert default.usage.completion_tokens == 16  # the completions endpoint's default, as OpenAI's


def test_stop_strings_end_the_reply_before_them(client):
    free = chat(client, max_tokens=24, temperature=0).choices[0].message.content
    word = free.split()[2]
    stopped = chat(client, max_tokens=24, temperature=0, stop=[word, "zzz"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == free[: free.index(word)]


def test_a_seed_makes_sampling_reproducible(client):
    def sample(seed):
        return chat(client, max_tokens=16, temperature=1.2, seed=seed).choices[0].message.content
    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_chat_turns_reuse_state_and_match_a_fresh_prefill(client, engine):
    messages = list(USER)
    for turn, followup in enumerate(["And then?", "Why?", None]):
        answer = chat(client, messages, max_tokens=8, temperature=0)
        fresh = engine.complete(Request(messages=messages, max_new_tokens=8, temperature=0))
        assert answer.choices[0].message.content == fresh.text
        if turn:
            assert answer.usage.prompt_tokens_details.cached_tokens > 0
        messages += [{"role": "assistant", "content": answer.choices[0].message.content},
                     {"role": "user", "content": followup}]


def test_the_readme_curl_example_runs(server):
    if shutil.which("curl") is None:
        pytest.skip("no curl here")
    command = re.search(r"^curl .*?(?<!\\)$", README.read_text(), re.S | re.M).group(0)
    assert "127.0.0.1:8000" in command
    done = subprocess.run(["bash", "-c", command.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"]
    assert shlex.split(command)[0] == "curl"


# --- limits

def test_a_client_that_goes_away_cancels_its_generation(server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1900, "stream": True}
    url = f"{server.url}/v1/completions"
    with httpx2.Client(trust_env=False) as http, http.stream("POST", url, json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert server.health()["running"] == 1
    wait_until(lambda: server.health()["running"] == 0, 10, "the cancelled generation to stop")
    cancelled = wait_until(lambda: re.search(r'"POST /v1/completions" 200 .* completion=(\d+) finish=cancelled',
                                             server.log.read_text()), 10, "the access log to show the cancellation")
    assert 1 <= int(cancelled.group(1)) < 1900


def test_a_client_that_gives_up_on_a_plain_request_cancels_it_too(server):
    with pytest.raises(httpx2.ReadTimeout):
        httpx2.post(f"{server.url}/v1/completions", json={"prompt": "Once upon", "max_tokens": 1900}, timeout=1.5)
    wait_until(lambda: server.health()["running"] == 0, 10, "the abandoned generation to stop")


def test_a_full_queue_answers_503_with_retry_after(server, client):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1900, "stream": True}
    url = f"{server.url}/v1/completions"
    with httpx2.Client(trust_env=False) as first, first.stream("POST", url, json=body) as running:
        lines = running.iter_lines()  # kept: closing the iterator would close the stream
        assert next(lines).startswith("data: ")
        with httpx2.Client(trust_env=False) as second, \
                second.stream("POST", f"{server.url}/v1/completions", json=body) as waiting:
            assert waiting.status_code == 200
            wait_until(lambda: server.health()["waiting"] == 1, 10, "the second request to wait")
            with pytest.raises(openai.APIStatusError) as refused:
                client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert refused.value.status_code == 503 and refused.value.response.headers["retry-after"].isdigit()
    assert refused.value.body["code"] == "queue_full"
    wait_until(lambda: server.health() == {"status": "ok", "model": MODEL, "running": 0, "waiting": 0}, 10,
               "the queue to empty")


def test_the_access_log_names_requests_but_not_their_text(server, client):
    seen = len(server.log.read_text().splitlines())
    chat(client, [{"role": "user", "content": "xylophone quandary"}], max_tokens=2)
    (line,) = wait_until(lambda: server.log.read_text().splitlines()[seen:], 10, "the request's log line")
    assert re.search(r'^qwen3next: 127\.0\.0\.1:\d+ "POST /v1/chat/completions" 200 [\d.]+s prompt=\d+ cached=\d+ '
                     r"completion=2 finish=length$", line)
    assert "xylophone" not in server.log.read_text()


# --- bad inputs: an OpenAI-shaped error with the right status, and the server goes on serving

LONG_PROMPT = "word " * 2100  # more tokens than the demo model's 2048 positions, well under the body limit
BAD_CHAT = [
    ({"messages": []}, 400, "messages"),
    ({}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 7}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "messages[0].content[0]"),
    ({"messages": USER, "temperature": -1}, 400, "temperature"),
    ({"messages": USER, "temperature": 3}, 400, "temperature"),
    ({"messages": USER, "temperature": "hot"}, 400, "temperature"),
    ({"messages": USER, "top_p": 0}, 400, "top_p"),
    ({"messages": USER, "top_p": 1.5}, 400, "top_p"),
    ({"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": USER, "max_tokens": -3}, 400, "max_tokens"),
    ({"messages": USER, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ({"messages": USER, "max_tokens": 5000}, 400, "max_tokens"),
    ({"messages": USER, "n": 2}, 400, "n"),
    ({"messages": USER, "logprobs": True}, 400, "logprobs"),
    ({"messages": USER, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"messages": USER, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"messages": USER, "tool_choice": "required", "tools": []}, 400, "tool_choice"),
    ({"messages": USER, "tools": {"type": "function"}}, 400, "tools"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"description": "no name"}}]}, 400, "tools[0]"),
    ({"messages": USER, "stream": "yes"}, 400, "stream"),
    ({"messages": USER, "frobnicate": 1}, 400, "frobnicate"),
    ({"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, "messages"),
    ({"messages": USER, "model": "gpt-4o"}, 404, "model"),
]


@pytest.mark.parametrize("body, status, param", BAD_CHAT, ids=[f"{p}-{s}-{i}" for i, (_, s, p) in enumerate(BAD_CHAT)])
def test_a_bad_chat_request_is_an_openai_error(server, body, status, param):
    response = post(server, "/v1/chat/completions", {"model": MODEL, **body})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert "\n" not in error["message"]


def test_errors_give_both_numbers_when_the_context_is_exceeded(server):
    too_many = post(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 5000}).json()["error"]
    assert too_many["code"] == "context_length_exceeded"
    assert re.search(r"5000 .* 2048 .* leaves \d+", too_many["message"])
    too_long = post(server, "/v1/completions", {"prompt": LONG_PROMPT}).json()["error"]
    assert too_long["param"] == "prompt" and re.search(r"prompt is \d+ tokens .* context is 2048", too_long["message"])


@pytest.mark.parametrize("body, status, param", [
    (b'{"prompt": "Hi", "max_tokens": ', 400, None),  # malformed JSON
    (b"\xff\xfe not text", 400, None),
    (json.dumps({"prompt": "x" * (MAX_BODY + 1)}), 413, None),
    ({"prompt": ["one", "two"]}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "Hi", "echo": True}, 400, "echo"),
    ({"prompt": "Hi", "best_of": 3}, 400, "best_of"),
    ({"prompt": "Hi", "stop": 5}, 400, "stop"),
    ({"prompt": "Hi", "seed": "x"}, 400, "seed"),
    ({"prompt": [10**9]}, 400, "prompt"),  # a token id past the vocabulary
])
def test_a_bad_completion_request_is_an_openai_error(server, body, status, param):
    response = post(server, "/v1/completions", body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_unknown_endpoints_and_methods_are_openai_errors(server):
    assert httpx2.get(f"{server.url}/v1/nothing").json()["error"]["message"] == "no such endpoint: /v1/nothing"
    assert httpx2.get(f"{server.url}/v1/chat/completions").status_code == 405


def test_fields_that_change_nothing_are_accepted(client):
    answer = chat(client, max_tokens=2, user="u1", metadata={"k": "v"}, n=1, logprobs=False, frequency_penalty=0,
                  response_format={"type": "text"})
    assert answer.usage.completion_tokens == 2


def test_the_server_keeps_serving_after_bad_input(server, client):
    post(server, "/v1/chat/completions", b"{")
    assert server.health()["status"] == "ok"
    assert chat(client, max_tokens=2).usage.completion_tokens == 2


# --- tool calls, reasoning, the API key and a failing template: an in-process server with scripted replies

KEY = "sesame-" + "x" * 20
REFUSING_TEMPLATE = ("{%- if messages[0].role == 'assistant' %}{{- raise_exception('a conversation must open with a "
                     "user or system message') }}{%- endif %}")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


class Scripted:
    """The engine with its replies scripted: prompts are rendered and tokenized for real, and recorded."""

    def __init__(self, engine):
        self.engine, self.replies, self.prompts = engine, [], []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def stream(self, request: Request):
        self.prompts.append(self.tokenizer.decode(request.prompt))
        ids = self.tokenizer.encode(self.replies.pop(0))
        detokenizer = self.tokenizer.detokenizer()
        for token in ids:
            yield Token(token, detokenizer.add(token))
        yield Result(tokens=ids, finish_reason="stop", usage=Usage(len(request.prompt), len(ids)))


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    folder = Path(shutil.copytree(DEMO_MODEL, tmp_path_factory.mktemp("refusing") / "model"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = REFUSING_TEMPLATE + config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    engine = Scripted(qwen3next.load(folder, dtype="float32", quiet=True))
    port = free_port()
    app = create_app(engine, "scripted", api_key=KEY, log=lambda line: None)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 60, "the in-process server")
    engine.url = f"http://127.0.0.1:{port}"
    engine.client = openai.OpenAI(base_url=f"{engine.url}/v1", api_key=KEY, max_retries=0,
                                  http_client=httpx2.Client(trust_env=False, timeout=60))
    yield engine
    server.should_exit = True
    thread.join(30)


def test_a_tool_call_round_trip(scripted):
    client = scripted.client
    scripted.replies[:] = ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bath"}}\n</tool_call>',
                           "It is raining in Bath."]
    messages = [{"role": "user", "content": "What is the weather in Bath?"}]
    first = client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER])
    assert "get_weather" in scripted.prompts[-1] and "<tools>" in scripted.prompts[-1]  # the tools were rendered
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Bath"}
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "rain"}'}]
    second = client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER])
    assert '<tool_response>\n{"sky": "rain"}\n</tool_response>' in scripted.prompts[-1]
    assert '{"name": "get_weather", "arguments": {"city": "Bath"}}' in scripted.prompts[-1]
    assert second.choices[0].message.content == "It is raining in Bath." and second.choices[0].finish_reason == "stop"


def test_tool_calls_stream_as_deltas(scripted):
    scripted.replies[:] = ['Looking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Derby"}}\n'
                           '</tool_call>']
    chunks = list(scripted.client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER], stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    parts = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert content == "Looking." and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert parts[0].id.startswith("call_") and parts[0].function.name == "get_weather"
    assert json.loads("".join(p.function.arguments or "" for p in parts)) == {"city": "Derby"}
    assert {p.index for p in parts} == {0}


def test_a_malformed_tool_call_comes_back_as_content(scripted):
    scripted.replies[:] = ['<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>']
    answer = scripted.client.chat.completions.create(model="scripted", messages=USER, tools=[WEATHER])
    assert answer.choices[0].message.content == scripted.tokenizer.decode(
        scripted.tokenizer.encode('<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>'))
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason == "stop"


def test_reasoning_comes_apart_from_the_content(scripted):
    scripted.replies[:] = ["<think>\nShe is the second sister.\n</think>\n\nElizabeth Bennet."]
    answer = scripted.client.chat.completions.create(model="scripted", messages=USER)
    message = answer.choices[0].message
    assert message.content == "Elizabeth Bennet." and message.reasoning_content == "\nShe is the second sister.\n"


def test_a_failing_chat_template_is_a_400_naming_its_error(scripted):
    with pytest.raises(openai.BadRequestError) as error:
        scripted.client.chat.completions.create(model="scripted", messages=[{"role": "assistant", "content": "Hi"}])
    assert error.value.body["param"] == "messages" and error.value.body["code"] == "chat_template_error"
    assert "a conversation must open with a user or system message" in error.value.body["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
def test_without_the_api_key_every_endpoint_but_health_is_401(scripted, headers):
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")]:
        response = httpx2.request(method, scripted.url + path, headers=headers, json={"prompt": "Hi"})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx2.get(f"{scripted.url}/health").status_code == 200
    assert [m.id for m in scripted.client.models.list().data] == ["scripted"]


# --- the command

def test_without_the_serve_extra_serve_says_what_to_install(monkeypatch, capsys):
    from qwen3next.cli.main import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    assert main(["serve"]) == 1
    assert capsys.readouterr().err == 'qwen3next: error: serve needs uvicorn: pip install "qwen3next[serve]"\n'


def test_listening_beyond_loopback_without_a_key_warns(tmp_path, capsys):
    from qwen3next.cli.main import main

    assert main(["serve", "--host", "0.0.0.0", "--model", str(tmp_path / "none")]) == 1  # fails at loading
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0 without --api-key" in err and err.count("\n") == 2


def test_a_bad_body_limit_names_its_flag(capsys):
    from qwen3next.cli.main import main

    assert main(["serve", "--max-body", "lots"]) == 2
    assert capsys.readouterr().err.startswith("qwen3next: error: --max-body 'lots': not a size")


def test_the_model_id_is_the_name_given_the_hub_id_or_the_folder(tmp_path):
    from qwen3next.cli.serve import _model_id

    assert _model_id(None) == MODEL
    assert _model_id("Qwen/Qwen3-Next-80B-A3B-Instruct") == "Qwen/Qwen3-Next-80B-A3B-Instruct"
    assert _model_id(str(tmp_path)) == tmp_path.name
