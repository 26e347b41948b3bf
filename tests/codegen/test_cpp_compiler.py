"""The C++ toolchain path: the on-disk cache, a missing or failing compiler (ATen fallback)."""

import os
import stat
import warnings

import pytest
import torch

import jitopt
from jitopt.codegen import cpp_compiler
from jitopt.errors import JitoptFallbackWarning


def _chain(x):
    return torch.sigmoid(x * 2 + 1) * x


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("JITOPT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _compile_and_check(**options):
    x = torch.randn(37, 5)
    fn = torch.compile(_chain, backend="jitopt", options=options)
    torch.testing.assert_close(fn(x), _chain(x))


def test_second_compile_comes_from_the_cache(cache_dir, monkeypatch):
    _compile_and_check()
    (entry,) = cache_dir.rglob("*.so")
    torch._dynamo.reset()
    calls = []
    real_run = cpp_compiler.subprocess.run
    monkeypatch.setattr(cpp_compiler.subprocess, "run",
                        lambda cmd, **kw: calls.append(cmd) or real_run(cmd, **kw))
    _compile_and_check()
    assert not [c for c in calls if "-shared" in c]  # no compiler run, only `--version`
    assert list(cache_dir.rglob("*.so")) == [entry]


def test_truncated_cache_entry_is_rebuilt(cache_dir):
    _compile_and_check()
    (entry,) = cache_dir.rglob("*.so")
    # Another process left half a file (a new file: this process has the old one mapped).
    data = entry.read_bytes()
    entry.unlink()
    entry.write_bytes(data[:100])
    torch._dynamo.reset()
    _compile_and_check()
    assert entry.stat().st_size > 100
    assert jitopt.counters["targets"]["cpp_partitions"] == 2


def _fallback_warnings(**options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _compile_and_check(on_error="warn", **options)
    return [w for w in caught if issubclass(w.category, JitoptFallbackWarning)]


def test_missing_compiler_falls_back_to_aten_with_one_warning(cache_dir, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    cpp_compiler._toolchain_identity.cache_clear()
    found = _fallback_warnings()
    assert len(found) == 1
    assert "/nonexistent/c++" in str(found[0].message)
    assert jitopt.counters["fallbacks"]["partition"] == 1


def test_compile_error_falls_back_to_aten_with_the_compiler_message(cache_dir, tmp_path,
                                                                   monkeypatch):
    broken = tmp_path / "broken-cxx"
    broken.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo broken 1.0; exit 0; }\n"
                      "echo 'kernels.cpp:1: error: something is wrong' >&2\nexit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CXX", str(broken))
    found = _fallback_warnings()
    assert len(found) == 1
    assert "something is wrong" in str(found[0].message)


def test_cxx_is_honoured_and_part_of_the_key(cache_dir, monkeypatch):
    monkeypatch.setenv("CXX", "g++")
    flags = cpp_compiler.flags()
    key_gxx = cpp_compiler.cache_key("int x;", "g++", flags)
    if os.path.exists("/usr/bin/c++"):
        assert cpp_compiler.cache_key("int x;", "/usr/bin/c++", flags) != key_gxx
    assert cpp_compiler.cache_key("int y;", "g++", flags) != key_gxx
    assert cpp_compiler.compiler() == "g++"
