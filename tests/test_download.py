"""`qwen3next download` against a fake hub on 127.0.0.1: transfers, resumes, refusals, bad inputs.

huggingface_hub reads HF_ENDPOINT and the cache location once, at import: in-process tests patch
its constants, the subprocess tests set the environment variables a user would.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from huggingface_hub import constants

import qwen3next.hub
import qwen3next.weights
from fake_hub import FakeHub
from qwen3next.weights import CheckpointReader, format_bytes
from test_cli import run_cli

REPO = "org/tiny"
TOKEN = "hf_test_token"
SHARD = "model-00003-of-00014.safetensors"


def _point_hub_at(monkeypatch, endpoint: str) -> None:
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture(autouse=True)
def no_real_hub(monkeypatch, tmp_path):
    """Even a test that forgets the fake hub never reaches the network: port 9 on 127.0.0.1 refuses."""
    _point_hub_at(monkeypatch, "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)


@pytest.fixture
def hub(models, monkeypatch):
    with FakeHub() as hub:
        hub.add_folder(REPO, models("tiny"))
        _point_hub_at(monkeypatch, hub.url)
        yield hub


@pytest.fixture
def cli(capsys):
    return lambda *args: run_cli([str(a) for a in args], capsys=capsys)


def hub_process(hub: FakeHub, home: Path, *args: str, **popen) -> subprocess.Popen:
    """`qwen3next ARGS` in a fresh process configured the way a user would: environment variables only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_TOKEN=TOKEN, NO_PROXY="127.0.0.1,localhost")
    # Ctrl-C as a terminal delivers it: a test run started in the background (`cmd &` in a script) ignores
    # SIGINT, the child would inherit that, and Python installs no KeyboardInterrupt handler then
    return subprocess.Popen([sys.executable, "-m", "qwen3next", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)


def _first_range(shard: Path) -> str:
    """The range request that fetches a shard's header (the whole of a shard smaller than the first range)."""
    return f"bytes=0-{min(shard.stat().st_size, qwen3next.hub._FIRST_RANGE) - 1}"


def test_a_long_shard_header_takes_a_second_range_request(hub, models, monkeypatch):
    monkeypatch.setattr(qwen3next.hub, "_FIRST_RANGE", 16)
    listing = qwen3next.hub.list_files(REPO)
    shard = next(f for f in listing.files if f.path == SHARD)
    raw = (models("tiny") / SHARD).read_bytes()
    length = int.from_bytes(raw[:8], "little")
    assert qwen3next.hub._fetch_headers(listing, [shard]) == {SHARD: (raw[:8 + length], len(raw))}
    assert [s.range for s in hub.gets(SHARD)] == ["bytes=0-15", f"bytes=16-{7 + length}"]


def assert_same_files(folder: Path, source: Path, names=None) -> None:
    names = names or [p.name for p in source.iterdir()]
    for name in names:
        assert (folder / name).read_bytes() == (source / name).read_bytes(), name


def test_download_to_a_folder(hub, cli, models, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = cli("download", REPO, "--out", out)
    assert code == 0, stderr
    assert Path(stdout.strip()) == out.resolve()
    assert_same_files(out, models("tiny"))
    assert "19 files" in stderr and "19 to fetch" in stderr
    with CheckpointReader(out) as reader:
        assert reader.total_bytes() > 0
    # the token goes to the hub, never to the CDN the weights come from
    assert all(s.authorization == f"Bearer {TOKEN}" for s in hub.log if not s.url.startswith("/cdn/"))
    assert all(s.authorization is None for s in hub.log if s.url.startswith("/cdn/"))
    assert any(s.url.startswith("/cdn/") for s in hub.log)


@pytest.mark.slow
def test_download_into_the_cache_then_inspect_by_hub_id(hub, models, tmp_path):
    """The whole path a user takes, in real processes: download (quiet), then use the hub id."""
    done = hub_process(hub, tmp_path / "home", "download", REPO, "-q")
    stdout, stderr = done.communicate(timeout=120)
    assert done.returncode == 0 and stderr == "", stderr
    snapshot = Path(stdout.strip())
    assert snapshot.parent.name == "snapshots" and snapshot.is_relative_to(tmp_path / "home" / "hub")
    assert_same_files(snapshot, models("tiny"))
    shown = hub_process(hub, tmp_path / "home", "inspect", REPO)
    stdout, stderr = shown.communicate(timeout=120)
    assert shown.returncode == 0, stderr
    assert str(snapshot) in stdout and "Gated DeltaNet" in stdout


def test_a_dropped_connection_resumes_from_the_byte_where_it_stopped(hub, cli, models, monkeypatch, tmp_path):
    # huggingface_hub writes in chunks of DOWNLOAD_CHUNK_SIZE (10 MB), so it resumes after the last whole chunk
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16384)
    hub.fault(SHARD, drop_after=50_000)
    code, _, stderr = cli("download", REPO, "--out", tmp_path / "out", "-q")
    assert code == 0, stderr
    assert [s.range for s in hub.gets(SHARD)] == [None, f"bytes={3 * 16384}-"]
    assert_same_files(tmp_path / "out", models("tiny"))


def test_a_server_error_mid_file_stops_and_the_next_run_resumes(hub, cli, models, tmp_path):
    out = tmp_path / "out"
    hub.fault(SHARD, drop_after=50_000)  # the connection breaks mid-file...
    hub.fault(SHARD, status=500)  # ...and the retry meets a server error
    code, _, stderr = cli("download", REPO, "--out", out, "-q")
    assert code == 1 and stderr.count("\n") == 1
    assert stderr.startswith(f"qwen3next: error: {REPO}: the hub answered HTTP 500")
    assert "run the command again to resume" in stderr
    finished = ["config.json", "generation_config.json", "model-00001-of-00014.safetensors",
                "model-00002-of-00014.safetensors"]
    assert_same_files(out, models("tiny"), finished)
    assert not (out / SHARD).exists()

    code, _, stderr = cli("download", REPO, "--out", out, "-q")
    assert code == 0, stderr
    assert_same_files(out, models("tiny"))
    assert all(len(hub.gets(name)) == 1 for name in finished)  # kept, not fetched again
    assert len(hub.gets(SHARD)) == 3


@pytest.mark.slow
def test_ctrl_c_mid_file_then_a_rerun_completes(hub, cli, models, tmp_path):
    out = tmp_path / "out"
    hub.fault(SHARD, stall_after=50_000)
    proc = hub_process(hub, tmp_path / "home", "download", REPO, "--out", str(out), "-q")
    try:
        assert hub.stalled.wait(120), "the transfer never reached the stalled shard"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        hub.release.set()
    assert proc.returncode == 130 and stderr.strip() == "qwen3next: error: interrupted"  # click adds a newline after ^C
    kept = sorted(p.name for p in out.iterdir() if p.is_file())
    assert SHARD not in kept and "model-00002-of-00014.safetensors" in kept

    code, _, stderr = cli("download", REPO, "--out", out, "-q")
    assert code == 0, stderr
    assert_same_files(out, models("tiny"))
    assert all(len(hub.gets(name)) == 1 for name in kept)
    assert len(hub.gets(SHARD)) == 2


@pytest.mark.parametrize("args, fault, code, message", [
    (["org/missing"], None, 1, "org/missing: no such repository on http://127.0.0.1:"),
    ([REPO, "--revision", "nope"], None, 1, f"{REPO}: no revision 'nope' (a branch, tag or commit id)"),
    (["not a repo id"], None, 2, "'not a repo id' is not a hub repository id"),
    ([REPO, "--include", "*.bin"], None, 2, f"{REPO}: no file matches --include '*.bin'"),
    ([REPO], dict(target="api", status=503), 1, f"{REPO}: the hub answered HTTP 503"),
])
def test_bad_requests_fail_in_one_line_before_writing_anything(hub, cli, tmp_path, args, fault, code, message):
    if fault:
        hub.fault(**fault)
    got, stdout, stderr = cli("download", *args, "--out", tmp_path / "out")
    assert (got, stdout) == (code, "")
    assert stderr.startswith(f"qwen3next: error: {message}") and stderr.count("\n") == 1, stderr
    assert not (tmp_path / "out").exists()


def test_no_network_is_one_clear_line(cli, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    _point_hub_at(monkeypatch, endpoint)
    code, _, stderr = cli("download", REPO)
    assert code == 1 and stderr.count("\n") == 1 and "Traceback" not in stderr
    assert stderr.startswith(f"qwen3next: error: no connection to the hub at {endpoint} (ConnectError:")


def test_not_enough_disk_space_is_refused_before_any_transfer(hub, cli, models, monkeypatch, tmp_path):
    out = tmp_path / "out"
    monkeypatch.setattr(qwen3next.weights, "free_bytes", lambda folder: 1000)
    code, _, stderr = cli("download", REPO, "--out", out)
    assert code == 1
    total = format_bytes(sum(p.stat().st_size for p in models("tiny").iterdir()))
    assert f"--out {out}: not enough disk space: {REPO} needs {total} more (19 of 19 files), 1.0 kB free" in stderr
    assert {s.target for s in hub.log} == {"api"} and not out.exists()

    # only what is missing has to fit
    monkeypatch.setattr(qwen3next.weights, "free_bytes", lambda folder: 10**12)
    assert cli("download", REPO, "--out", out, "-q")[0] == 0
    (out / SHARD).unlink()
    monkeypatch.setattr(qwen3next.weights, "free_bytes", lambda folder: (out / "config.json").stat().st_size)
    code, _, stderr = cli("download", REPO, "--out", out)
    assert code == 1 and f"needs {format_bytes((models('tiny') / SHARD).stat().st_size)} more (1 of 19 files)" in stderr


def _raise(err: int):
    def fail(*args, **kwargs):
        raise OSError(err, os.strerror(err))
    return fail


@pytest.mark.parametrize("setup, out_name, message", [
    (lambda mp, tmp: mp.setattr(tempfile, "TemporaryFile", _raise(errno.EROFS)), "out",
     "cannot write there (Read-only file system)"),
    (lambda mp, tmp: mp.setattr(qwen3next.hub, "hf_hub_download", _raise(errno.ENOSPC)), "out",
     "the disk is full (No space left on device); free some space, then run the command again to resume "
     "(finished files are kept)"),
    (lambda mp, tmp: (tmp / "file").write_text("x"), "file/out", "a part of that path is a file, not a folder"),
])
def test_an_unwritable_or_full_destination_is_one_line(hub, cli, monkeypatch, tmp_path, setup, out_name, message):
    out = tmp_path / out_name
    setup(monkeypatch, tmp_path)
    code, _, stderr = cli("download", REPO, "--out", out, "-q")
    assert (code, stderr) == (1, f"qwen3next: error: --out {out}: {message}\n")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(hub, cli, tmp_path):
    tmp_path.joinpath("ro").mkdir(mode=0o555)
    code, _, stderr = cli("download", REPO, "--out", tmp_path / "ro" / "out")
    assert code == 1 and "cannot write there (Permission denied)" in stderr


@pytest.mark.parametrize("where", ["out", "cache"])
def test_corrupt_local_files_are_fetched_again(hub, cli, models, tmp_path, where):
    args = ["download", REPO] + (["--out", tmp_path / "out"] if where == "out" else [])
    code, stdout, stderr = cli(*args, "-q")
    folder = Path(stdout.strip())
    data = bytearray((folder / SHARD).read_bytes())
    data[1000] ^= 0xFF  # same size, one bit pattern off: only the hash can tell
    (folder / SHARD).write_bytes(data)
    (folder / "tokenizer.json").write_text("{}")  # the wrong size
    code, _, stderr = cli(*args)
    assert code == 0, stderr
    assert f"{SHARD}: does not match the size and hash the hub reports; fetching it again" in stderr
    assert "tokenizer.json: does not match" in stderr
    assert_same_files(folder, models("tiny"))
    assert len(hub.gets(SHARD)) == 2 and len(hub.gets("tokenizer.json")) == 2
    assert len(hub.gets("config.json")) == 1


@pytest.mark.parametrize("times", [1, 2])
def test_a_corrupted_transfer_is_caught_by_the_hash(hub, cli, models, tmp_path, times):
    out = tmp_path / "out"
    hub.fault(SHARD, corrupt=True, times=times)
    code, _, stderr = cli("download", REPO, "--out", out)
    assert len(hub.gets(SHARD)) == 2
    if times == 1:
        assert code == 0 and "fetching it again" in stderr
        assert_same_files(out, models("tiny"))
    else:
        assert code == 1 and not (out / SHARD).exists()
        assert stderr.endswith(f"{REPO}: {SHARD} still differ(s) from the hub's size and hash after a second download "
                               "(removed); the hub or the connection is corrupting data\n")


def test_include_and_exclude_choose_the_files(hub, cli, tmp_path):
    out = tmp_path / "out"
    code, _, stderr = cli("download", REPO, "--out", out, "--include", "*.json", "--exclude", "tokenizer*", "-q")
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "config.json", "generation_config.json", "model.safetensors.index.json"]
    assert not any(s.url.startswith("/cdn/") for s in hub.log)


# ---- download --quantize: each shard converted on arrival, then deleted ----

def quantized_reference(models, tmp_path, bits: int = 4) -> Path:
    from qwen3next.quant.convert import quantize_checkpoint
    from qwen3next.quant.policy import Policy

    reference = tmp_path / f"reference-q{bits}"
    quantize_checkpoint(models("tiny"), reference, Policy(bits), progress=False)
    return reference


def test_download_quantize_streams_shards_and_equals_quantizing_afterwards(hub, cli, models, monkeypatch, tmp_path):
    from qwen3next.quant.convert import Conversion

    reference = quantized_reference(models, tmp_path)
    out = tmp_path / "q4"
    fetch_dir = tmp_path / ".q4.download"
    held = []
    convert = Conversion.convert

    def watching_convert(self, shard, advance=lambda n: None):
        held.append(len(list(fetch_dir.glob("*.safetensors"))))
        return convert(self, shard, advance)

    monkeypatch.setattr(Conversion, "convert", watching_convert)
    code, stdout, stderr = cli("download", REPO, "--out", out, "--quantize", "4", "-q")
    assert code == 0, stderr
    assert Path(stdout.strip()) == out
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert_same_files(out, reference)
    assert not fetch_dir.exists() and not (tmp_path / ".q4.partial").exists()
    shards = sorted(p.name for p in models("tiny").glob("*.safetensors"))
    assert len(held) == len(shards) and max(held) <= 2  # never the whole bf16 model on disk
    for name in shards:  # each fetched once (its header by one range request, then the file)
        ranges = [s.range for s in hub.gets(name)]
        assert ranges == [_first_range(models("tiny") / name), None]


@pytest.mark.slow
def test_download_quantize_killed_midway_resumes_without_downloading_done_shards_again(hub, models, tmp_path):
    out = tmp_path / "q4"
    staging = tmp_path / ".q4.partial"
    args = ("download", REPO, "--out", str(out), "--quantize", "4", "-q")
    process = hub_process(hub, tmp_path / "home", *args)
    while process.poll() is None and len(list(staging.glob("*.safetensors"))) < 3:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_first = sorted(p.name for p in staging.glob("*.safetensors"))
    assert not out.exists() and len(done_first) >= 3, "the run was not caught mid-way"
    fetched_first = {name: len(hub.gets(name)) for name in done_first}
    fetch_dir = tmp_path / ".q4.download"  # a source shard killed before its deletion is complete there
    kept = {name for name in done_first if (fetch_dir / name).is_file()
            and (fetch_dir / name).stat().st_size == (models("tiny") / name).stat().st_size}

    again = hub_process(hub, tmp_path / "home", *args)
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    assert_same_files(out, quantized_reference(models, tmp_path))
    # a shard whose output was finished is not downloaded again: only its header, by one range request,
    # or nothing when the killed run left its complete source behind
    for name in done_first:
        again_fetched = [s.range for s in hub.gets(name)[fetched_first[name]:]]
        expected = [] if name in kept else [_first_range(models("tiny") / name)]
        assert again_fetched == expected, (name, again_fetched)


def test_download_quantize_needs_out_and_stops_cleanly_on_a_server_error(hub, cli, models, tmp_path):
    code, _, stderr = cli("download", REPO, "--quantize", "4")
    assert code == 2 and "--quantize needs --out" in stderr
    out = tmp_path / "q8"
    hub.fault(SHARD, status=500)
    code, _, stderr = cli("download", REPO, "--out", out, "--quantize", "8", "-q")
    assert code == 1 and "HTTP 500" in stderr and stderr.count("\n") == 1
    assert not out.exists()
    code, _, stderr = cli("download", REPO, "--out", out, "--quantize", "8", "-q")
    assert code == 0, stderr
    assert_same_files(out, quantized_reference(models, tmp_path, bits=8))
