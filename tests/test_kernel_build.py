"""Building and loading the CPU kernels: every way it can fail ends in one notice and a working model.

Each test runs cpu_kernels as a new process would, with an empty cache under tmp_path; the test
process's own library and state come back afterwards (monkeypatch).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import shutil
import subprocess

import pytest
import torch

from qwen3next import cpu_kernels
from qwen3next.layers import linear

STATE = ("_lib", "_loaded", "_status", "_said", "MAX_ROWS", "MAX_CONV_KERNEL")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """cpu_kernels before its first prepare(), caching under tmp_path; returns the kernel cache folder."""
    cpu_kernels.prepare(quiet=True)  # the process's own library: what monkeypatch puts back
    for name in STATE:
        monkeypatch.setattr(cpu_kernels, name, getattr(cpu_kernels, name))
    monkeypatch.setattr(cpu_kernels, "_loaded", False)
    monkeypatch.setattr(cpu_kernels, "_said", set())
    monkeypatch.setenv("QWEN3NEXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(cpu_kernels.NO_KERNELS, raising=False)
    return tmp_path / "cache" / "kernels"


def compiler_or_skip() -> str:
    compiler = cpu_kernels._compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    return compiler


def notices(capsys) -> list[str]:
    lines = capsys.readouterr().err.splitlines()
    assert all(line.startswith("qwen3next: ") for line in lines), lines
    return [line.removeprefix("qwen3next: ") for line in lines]


def assert_models_still_compute(expect_kernels: bool):
    """Nothing lost: a bf16 logits-style product is right, through the kernels or torch."""
    x, w = torch.randn(2, 64).bfloat16(), torch.randn(30, 64).bfloat16()
    with torch.inference_mode():
        y = linear(x, w, fp32_out=True)
    assert (cpu_kernels.library() is not None) == expect_kernels
    assert torch.allclose(y, x.float() @ w.float().T, rtol=1e-5, atol=1e-5)


def test_no_compiler(fresh, monkeypatch, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CC", str(tmp_path / "missing-cc"))
    status = cpu_kernels.prepare(quiet=True)
    assert notices(capsys) == []  # quiet: the caller's --quiet
    assert status.describe() == "torch fallback (no C compiler)"
    cpu_kernels.prepare()
    cpu_kernels.prepare()
    [notice] = notices(capsys)  # once per process
    assert notice.startswith(f"no C compiler found (CC={tmp_path / 'missing-cc'} is not on PATH")
    assert "install gcc or set CC" in notice and "running the torch fallback" in notice
    assert cpu_kernels.MAX_ROWS == 0 and not fresh.exists()
    assert_models_still_compute(expect_kernels=False)


@pytest.mark.parametrize("broken", ["script", "false", "bad flag"])
def test_a_compiler_that_fails(fresh, monkeypatch, tmp_path, capsys, broken):
    monkeypatch.delenv(cpu_kernels.EXTRA_CFLAGS, raising=False)  # set by CI's variants; it changes the remedy
    if broken == "script":
        script = tmp_path / "cc"
        script.write_text("#!/bin/sh\necho 'decode_kernels.c:1:1: error: this compiler is broken' >&2\nexit 1\n")
        script.chmod(0o755)
        monkeypatch.setenv("CC", str(script))
        expected, remedy = "(decode_kernels.c:1:1: error: this compiler is broken;", "set CC to a working compiler"
    elif broken == "false":
        if shutil.which("false") is None:
            pytest.skip("no `false` on PATH")
        monkeypatch.setenv("CC", "false")
        expected, remedy = "(exit status 1;", "set CC to a working compiler"
    else:
        compiler_or_skip()
        monkeypatch.setenv(cpu_kernels.EXTRA_CFLAGS, "-mno-such-option")
        expected, remedy = "-mno-such-option", "check QWEN3NEXT_KERNEL_CFLAGS"
    status = cpu_kernels.prepare()
    assert status.describe() == "torch fallback (kernel build failed)"
    compiling, failed = notices(capsys)
    assert compiling.startswith("compiling CPU kernels for this machine (once; cached in ")
    assert failed.startswith("the CPU kernels did not build with ")
    assert expected in failed and remedy in failed and "running the torch fallback" in failed
    assert_models_still_compute(expect_kernels=False)


@pytest.mark.parametrize("problem", ["path is a file", "disk full"])
def test_an_unwritable_cache_builds_in_a_temporary_folder(fresh, monkeypatch, tmp_path, capsys, problem):
    compiler_or_skip()
    if problem == "path is a file":  # tests run as root: a read-only mode would not stop the writes
        (tmp_path / "cache").write_text("not a folder")
        expected = "Not a directory"
    else:
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(shutil, "copyfile", full)
        expected = os.strerror(errno.ENOSPC)
    status = cpu_kernels.prepare()
    assert status.isa is not None and status.path is None
    compiling, unwritable = notices(capsys)
    assert unwritable.startswith(f"kernel cache {fresh} is not writable ({expected}")
    assert "set QWEN3NEXT_CACHE to a writable folder" in unwritable
    assert not fresh.is_dir() or not any(fresh.iterdir())  # no partial file left behind
    assert_models_still_compute(expect_kernels=True)


@pytest.mark.parametrize("damage", ["garbage bytes", "a missing symbol"])
def test_a_damaged_cached_library_is_rebuilt(fresh, tmp_path, capsys, damage):
    compiler = compiler_or_skip()
    cached = cpu_kernels._candidates()[0][1]
    cached.parent.mkdir(parents=True)
    if damage == "garbage bytes":
        cached.write_bytes(b"\x00not a shared library" * 100)
    else:  # a real library, loadable, without the kernels' symbols
        (tmp_path / "other.c").write_text("int q3n_something_else(void) { return 1; }\n")
        subprocess.run([compiler, "-shared", "-fPIC", str(tmp_path / "other.c"), "-o", str(cached)], check=True)
    damaged = cached.read_bytes()
    status = cpu_kernels.prepare()
    assert status.isa is not None and status.path == cached
    assert cached.read_bytes() != damaged
    assert [line.split(" (")[0] for line in notices(capsys)] == ["compiling CPU kernels for this machine"]
    assert_models_still_compute(expect_kernels=True)


def test_no_kernels_by_request(fresh, monkeypatch, capsys):
    monkeypatch.setenv(cpu_kernels.NO_KERNELS, "1")
    assert cpu_kernels.prepare(quiet=True).describe() == "torch fallback (QWEN3NEXT_NO_KERNELS=1)"
    assert notices(capsys) == []
    cpu_kernels.prepare()
    assert notices(capsys) == ["QWEN3NEXT_NO_KERNELS=1: running the torch path by request"]
    assert not fresh.exists()  # nothing compiled
    assert_models_still_compute(expect_kernels=False)


def cached_copy_of_this_process_library(fresh):
    """The test process's library, copied under the name it would have in the fresh cache."""
    path = cpu_kernels._status.path
    if path is None or not path.exists():
        pytest.skip("this process's kernels are not in a cache")
    fresh.mkdir(parents=True)
    shutil.copyfile(path, fresh / path.name)
    return fresh / path.name


def test_a_cached_library_needs_no_compiler(fresh, monkeypatch, tmp_path, capsys):
    copy = cached_copy_of_this_process_library(fresh)
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    status = cpu_kernels.prepare()
    assert status.path == copy and status.isa is not None and notices(capsys) == []


def test_a_struct_size_mismatch_fails_loudly(fresh, monkeypatch):
    cached_copy_of_this_process_library(fresh)

    class ShortProjection(ctypes.Structure):
        _fields_ = [(name, ctypes.c_int64) for name in ("bits", "rows", "cols", "group", "codes", "scale")]

    monkeypatch.setitem(cpu_kernels.MIRRORS, "q3n_projection", ShortProjection)
    with pytest.raises(cpu_kernels.KernelMismatch,
                       match=rf"struct q3n_projection is {ctypes.sizeof(cpu_kernels.Projection)} bytes in C but 48 in "
                             r"cpu_kernels.ShortProjection"):
        cpu_kernels.prepare()
    assert not cpu_kernels._loaded  # never used, and the next call fails the same way


def expected_isa(compiler: str, flags: list[str]) -> str:
    """What the kernels should report for these flags, from the compiler's own target macros."""
    flags = [flag for flag in flags if not flag.startswith("-l")]
    done = subprocess.run([compiler, *flags, "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True,
                          check=True)
    macros = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("#define ")}
    if {"__AVX512F__", "__AVX512BW__"} <= macros:
        return "avx512-vnni" if {"__AVX512VL__", "__AVX512VNNI__"} <= macros else "avx512"
    if {"__AVX2__", "__FMA__"} <= macros:
        return "avx2-vnni" if {"__AVXVNNI__", "__F16C__"} <= macros else "avx2"
    return "neon" if "__ARM_NEON" in macros else "portable"


def test_the_loaded_library_reports_what_was_compiled():
    """Under each CI variant (QWEN3NEXT_KERNEL_CFLAGS) the ISA string names the paths that variant built."""
    status = cpu_kernels.prepare(quiet=True)
    if status.path is None:
        pytest.skip(f"no cached library: {status.describe()}")
    flags = next(flags for flags, path in cpu_kernels._candidates() if path == status.path)
    assert status.isa == expected_isa(compiler_or_skip(), flags)
    assert status.describe() == f"C kernels ({status.isa})"


def test_extra_cflags_are_part_of_the_cache_key(monkeypatch):
    monkeypatch.delenv(cpu_kernels.EXTRA_CFLAGS, raising=False)
    plain = cpu_kernels._candidates()
    monkeypatch.setenv(cpu_kernels.EXTRA_CFLAGS, "-mno-avx")
    narrowed = cpu_kernels._candidates()
    assert all(flags[-1] == "-mno-avx" for flags, _ in narrowed)
    assert not {path for _, path in plain} & {path for _, path in narrowed}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 flags")
def test_extra_cflags_build_the_portable_loops(fresh, monkeypatch):
    compiler_or_skip()
    monkeypatch.setenv(cpu_kernels.EXTRA_CFLAGS, "-mno-avx")
    assert cpu_kernels.prepare(quiet=True).describe() == "C kernels (portable)"
    assert_models_still_compute(expect_kernels=True)
