"""While torch.profiler records, each compiled partition's call shows in the trace under its
kernel's name; otherwise the plain wrapper runs."""

import torch
import torch.nn as nn

import jitopt


def _events(fn, *args) -> set[str]:
    with torch.profiler.profile() as profile:
        fn(*args)
    return {event.key for event in profile.key_averages()}


def test_kernels_are_named_in_a_profiler_trace():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    fast = torch.compile(model, backend="jitopt")
    with torch.no_grad():
        want = model(x)
        fast(x)
        jitopt.finish_compiles()
        events = _events(fast, x)
        torch.testing.assert_close(fast(x), want, atol=1e-5, rtol=1e-5)
    jitopt_events = sorted(e for e in events if e.startswith("jitopt "))
    assert jitopt_events, events
    assert all(": " in e for e in jitopt_events if "cpp_fused" in e)  # "<partition>: <kernel>"


def test_results_are_the_same_with_and_without_a_profiler():
    fast = torch.compile(lambda x: torch.relu(x) * 2, backend="jitopt")
    x = torch.randn(64)
    fast(x)
    jitopt.finish_compiles()
    torch.testing.assert_close(fast(x), torch.relu(x) * 2)
    assert any(e.startswith("jitopt ") for e in _events(fast, x))
    torch.testing.assert_close(fast(x), torch.relu(x) * 2)  # after the profiler: plain again
