"""`qwen3next run` as a user meets it: pipes, exit codes, one-line errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from qwen3next.cli.main import main


def run_cli(args, stdin: bytes | None = None, monkeypatch=None, capsys=None):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cli(monkeypatch, capsys):
    return lambda args, stdin=None: run_cli(args, stdin, monkeypatch, capsys)


@pytest.mark.slow
def test_pipeline_prompt_on_stdin_text_on_stdout_stats_on_stderr(models):
    """A real subprocess: stdin in, only generated text out, stats on stderr, exit 0."""
    folder = models("tiny")
    done = subprocess.run(
        [sys.executable, "-m", "qwen3next", "run", "--model", str(folder), "-n", "6", "-t", "0", "--stats", "-q"],
        input="Tell me a story".encode(), capture_output=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    import qwen3next

    engine = qwen3next.load(folder, dtype="bfloat16")
    expected = "".join(t.text for t in engine.generate("Tell me a story", max_new_tokens=6, temperature=0))
    assert done.stdout.decode() == expected + "\n"
    stderr = done.stderr.decode()
    assert "prompt: " in stderr and "decode" in stderr and "peak memory" in stderr


def test_prompt_flag_and_greedy(cli, models):
    code, out, err = cli(["run", "-m", str(models("tiny")), "-p", "Hello", "-n", "5", "-t", "0", "--dtype", "float32"])
    assert code == 0 and out.endswith("\n") and err == ""


def test_jsonl_answers_each_line(cli, models):
    requests = [
        {"prompt": "Hello", "max_new_tokens": 3, "temperature": 0},
        {"messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 2, "temperature": 0},
        {"prompt": [5, 6, 7], "max_new_tokens": 1, "temperature": 0},
    ]
    stdin = "\n".join(json.dumps(r) for r in requests).encode()
    code, out, err = cli(["run", "-m", str(models("tiny")), "--jsonl", "-q"], stdin)
    answers = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(answers) == 3
    assert [len(a["tokens"]) for a in answers] == [3, 2, 1]
    assert all(a["finish_reason"] == "length" for a in answers)
    assert [a["usage"]["completion_tokens"] for a in answers] == [3, 2, 1] and answers[2]["usage"]["prompt_tokens"] == 3


def test_jsonl_bad_line_is_answered_with_an_error_and_exit_1(cli, models):
    stdin = b'{"prompt": "Hello", "max_new_tokens": 2}\nnot json\n{"prompt": ""}\n{"prompt": "x", "bogus": 1}\n'
    code, out, _ = cli(["run", "-m", str(models("tiny")), "--jsonl", "-q"], stdin)
    answers = [json.loads(line) for line in out.splitlines()]
    assert code == 1
    assert "text" in answers[0]
    assert answers[1] == {"error": "stdin line 2: not valid JSON (Expecting value)", "line": 2}
    assert "empty" in answers[2]["error"] and "bogus" in answers[3]["error"]


def assert_one_line_error(code, err, expected_code, *fragments):
    assert code == expected_code
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwen3next: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in err


def test_empty_prompt(cli, models):
    assert_one_line_error(*cli(["run", "-m", str(models("tiny")), "-p", "  "])[::2], 2, "--prompt", "the prompt is empty")
    assert_one_line_error(*cli(["run", "-m", str(models("tiny"))], b"\n")[::2], 2, "stdin", "empty")


def test_prompt_longer_than_the_context(cli, models):
    code, _, err = cli(["run", "-m", str(models("short_context")), "-p", "word " * 100])
    assert_one_line_error(code, err, 2, "context", "48")


def test_invalid_utf8_on_stdin(cli, models):
    code, _, err = cli(["run", "-m", str(models("tiny"))], b"caf\xe9 au lait")
    assert_one_line_error(code, err, 2, "stdin", "UTF-8", "0xe9", "offset 3")


def test_negative_max_new_tokens(cli, models):
    code, _, err = cli(["run", "-m", str(models("tiny")), "-p", "x", "--max-new-tokens", "-3"])
    assert_one_line_error(code, err, 2, "--max-new-tokens")


def test_missing_model_folder(cli, tmp_path):
    code, _, err = cli(["run", "-m", str(tmp_path / "none"), "-p", "x"])
    assert_one_line_error(code, err, 1, "no such folder")


def test_folder_without_config(cli, tmp_path):
    code, _, err = cli(["run", "-m", str(tmp_path), "-p", "x"])
    assert_one_line_error(code, err, 1, "config.json")


def test_truncated_shard(cli, model_copy):
    folder = model_copy()
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    code, _, err = cli(["run", "-m", str(folder), "-p", "x"])
    assert_one_line_error(code, err, 1, shard.name)


def test_chat_template_reaching_python_internals_is_stopped(cli, model_copy):
    folder = model_copy()
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    config_path.write_text(json.dumps(config))
    code, out, err = cli(["run", "-m", str(folder), "-p", "x", "--chat"])
    assert_one_line_error(code, err, 1, "tokenizer_config.json")
    assert out == ""


def test_debug_shows_the_traceback(cli, tmp_path):
    with pytest.raises(Exception):
        cli(["--debug", "run", "-m", str(tmp_path), "-p", "x"])


def test_jsonl_and_prompt_conflict(cli, models):
    code, _, err = cli(["run", "-m", str(models("tiny")), "--jsonl", "-p", "x"])
    assert_one_line_error(code, err, 2, "--jsonl")


def test_unavailable_or_malformed_device(cli, models):
    import torch

    if not torch.cuda.is_available():
        code, _, err = cli(["run", "-m", str(models("tiny")), "-p", "x", "--device", "cuda"])
        assert_one_line_error(code, err, 2, "--device cuda", "no CUDA device")
    code, _, err = cli(["run", "-m", str(models("tiny")), "-p", "x", "--device", "gpu7"])
    assert_one_line_error(code, err, 2, "--device", "not a device")


def test_jsonl_wrong_types_are_answered_not_fatal(cli, models):
    stdin = b'{"prompt": "Hello", "max_new_tokens": "3"}\n{"prompt": "Hello", "max_new_tokens": 2, "top_k": null}\n' \
            b'{"prompt": "Hello", "max_new_tokens": 2, "temperature": 0}\n'
    code, out, _ = cli(["run", "-m", str(models("tiny")), "--jsonl", "-q"], stdin)
    answers = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and len(answers) == 3
    assert answers[0]["field"] == "max_new_tokens" and answers[0]["error"].startswith("max_new_tokens '3': ")
    assert len(answers[1]["tokens"]) == 2  # null means unset: the flag's (or generation_config's) default
    assert len(answers[2]["tokens"]) == 2


@pytest.mark.parametrize("bad", ["0", "-2", "two"])
def test_bad_thread_counts_name_the_flag(cli, models, bad):
    code, _, err = cli(["run", "-m", str(models("tiny")), "-p", "x", "--threads", bad])
    assert_one_line_error(code, err, 2, "--threads")


def test_threads_sets_the_thread_count_and_load_checks_it(cli, models):
    import torch

    import qwen3next
    from qwen3next.errors import RequestError

    before = torch.get_num_threads()
    try:
        code, out, err = cli(["run", "-m", str(models("tiny")), "-p", "x", "-n", "3", "-t", "0", "--threads", "1"])
        assert code == 0, err
        assert torch.get_num_threads() == 1
        with pytest.raises(RequestError, match="threads"):
            qwen3next.load(models("tiny"), threads=0)
    finally:
        torch.set_num_threads(before)
