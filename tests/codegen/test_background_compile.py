"""Kernels built in a background thread: the first call does not wait for the C++ compiler,
runs the groups' ATen ops meanwhile, and switches to the kernels once they are built."""

import concurrent.futures
import threading
import warnings

import pytest
import torch

import jitopt
from jitopt.codegen import cpp_target
from jitopt.errors import JitoptFallbackWarning
from jitopt.runtime.cpp_loader import DeferredLauncher

BACKGROUND = {"background_compile": True, "on_error": "warn"}


@pytest.fixture(autouse=True)
def empty_kernel_cache(monkeypatch, tmp_path):
    """A cached library loads at once, with no build to wait for: start every test cold."""
    monkeypatch.setenv("JITOPT_CACHE_DIR", str(tmp_path))


def _chain(x):
    return torch.sigmoid(x * 1.5 + 1).relu() * x


class _Gate:
    """Stands in for the compiler run: blocks until opened, then builds for real (or fails)."""

    def __init__(self, monkeypatch, fail: bool = False):
        self.opened, self.started, self.fail = threading.Event(), threading.Event(), fail
        real = cpp_target.LibraryBuild.run
        gate = self

        def run(build, background=False):
            gate.started.set()
            gate.opened.wait(timeout=60)
            if gate.fail:
                raise RuntimeError("the compiler crashed")
            return real(build, background)

        monkeypatch.setattr(cpp_target.LibraryBuild, "run", run)


def _launchers(monkeypatch) -> list:
    made = []
    original = cpp_target.CppArtifact.defer

    def defer(self, build, fallback):
        original(self, build, fallback)
        made.append(self)

    monkeypatch.setattr(cpp_target.CppArtifact, "defer", defer)
    return made


def test_first_call_runs_aten_until_the_kernels_are_built(monkeypatch):
    gate, artifacts = _Gate(monkeypatch), _launchers(monkeypatch)
    compiled = torch.compile(_chain, backend="jitopt", options=BACKGROUND)
    x = torch.randn(64, 33)
    torch.testing.assert_close(compiled(x), _chain(x))  # while the build is blocked
    assert gate.started.wait(timeout=30) and len(artifacts) == 1
    assert isinstance(artifacts[0].launcher, cpp_target.DeferredLauncher)
    gate.opened.set()
    jitopt.finish_compiles(timeout=60)
    torch.testing.assert_close(compiled(x), _chain(x))
    assert not isinstance(artifacts[0].launcher, cpp_target.DeferredLauncher)


def test_failed_build_warns_once_and_stays_on_aten(monkeypatch):
    gate = _Gate(monkeypatch, fail=True)
    compiled = torch.compile(_chain, backend="jitopt", options=BACKGROUND)
    x = torch.randn(16, 8)
    compiled(x)
    gate.opened.set()
    jitopt.finish_compiles(timeout=60)
    with pytest.warns(JitoptFallbackWarning, match="the compiler crashed"):
        torch.testing.assert_close(compiled(x), _chain(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(compiled(x), _chain(x))


def test_on_error_raise_builds_before_returning(monkeypatch):
    gate = _Gate(monkeypatch)
    gate.opened.set()
    artifacts = _launchers(monkeypatch)
    compiled = torch.compile(_chain, backend="jitopt",
                             options={"background_compile": True, "on_error": "raise"})
    x = torch.randn(16, 8)
    torch.testing.assert_close(compiled(x), _chain(x))
    assert gate.started.is_set() and artifacts == []


def test_aten_results_never_alias_inputs_or_each_other():
    """Kernel outputs are fresh buffers the memory plan may reuse; while the group runs on
    ATen, a view among its outputs must become a copy."""
    x = torch.randn(4, 6)
    pending = concurrent.futures.Future()
    launcher = DeferredLauncher(pending, finish=None, on_ready=None,
                                fallback=lambda t: (t.view(24), t * 2, (t * 2).view(6, 4)))
    view_of_input, doubled, _ = launcher(x)
    assert view_of_input.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    torch.testing.assert_close(view_of_input, x.view(24))
    single = DeferredLauncher(pending, finish=None, on_ready=None, fallback=lambda t: t[1:])
    assert single(x).untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


def test_a_cached_library_is_used_from_the_first_call(monkeypatch):
    x = torch.randn(16, 8)
    torch.compile(_chain, backend="jitopt", options=BACKGROUND)(x)
    jitopt.finish_compiles(timeout=60)
    torch._dynamo.reset()
    artifacts = _launchers(monkeypatch)
    torch.testing.assert_close(torch.compile(_chain, backend="jitopt", options=BACKGROUND)(x),
                               _chain(x))
    assert artifacts == []  # nothing deferred: the library came from the cache
