import torch
import torch.nn as nn
from comparisons import assert_same

import jitopt


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):  # x: [B, T, 16]
        h = self.norm(self.proj(x))
        return torch.softmax(h @ h.transpose(1, 2) / 4, dim=-1) @ h


def test_dynamic_true_serves_three_sizes_from_one_graph():
    model = Model().eval()
    fast = torch.compile(model, backend="jitopt", dynamic=True)
    with torch.no_grad():
        for b, t in [(2, 3), (3, 7), (5, 12)]:  # size 1 would specialize
            x = torch.randn(b, t, 16)
            assert_same(fast(x), model(x), atol=2e-5)
    assert jitopt.counters["graphs"]["captured"] == 1
    assert jitopt.counters["graphs"]["compiled_inference"] == 1


def test_mark_dynamic():
    model = Model().eval()
    fast = torch.compile(model, backend="jitopt")
    with torch.no_grad():
        for t in (5, 9, 17):
            x = torch.randn(2, t, 16)
            torch._dynamo.mark_dynamic(x, 1)
            assert_same(fast(x), model(x), atol=2e-5)
    assert jitopt.counters["graphs"]["captured"] == 1


def test_automatic_dynamic_after_a_size_change():
    model = Model().eval()
    fast = torch.compile(model, backend="jitopt")
    with torch.no_grad():
        for t in (4, 6, 8, 10):
            x = torch.randn(1, t, 16)
            assert_same(fast(x), model(x), atol=2e-5)
    # One static graph, then one with a symbolic length that serves every later size.
    assert jitopt.counters["graphs"]["captured"] == 2


def test_dynamic_training_step():
    model = Model()
    fast = torch.compile(model, backend="jitopt", dynamic=True)
    for t in (3, 5, 8):
        x = torch.randn(2, t, 16)
        model.zero_grad()
        model(x).square().mean().backward()
        expected = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        fast(x).square().mean().backward()
        for p, g in zip(model.parameters(), expected):
            assert_same(p.grad, g, atol=1e-5)


def test_a_slice_with_symbolic_strides_runs_in_a_generated_kernel():
    """Regression: a kernel input sliced from a [1, s, 3C] projection (GPT-2's q, k, v) has
    symbolic, non-contiguous strides (3C s, 3C, 1); the launcher could not check them, every
    such group fell back to ATen, and a generation compiled after another backend (so
    dynamic from its first graph) reported a fallback."""
    def fn(qkv):
        q, k, v = qkv.split(8, dim=-1)
        return torch.relu(q) * k + v

    compiled = torch.compile(fn, backend="jitopt", dynamic=True)
    for length in (5, 9):
        x = torch.randn(1, length, 24)
        assert_same(compiled(x), fn(x))
    assert jitopt.counters["fallbacks"]["partition"] == 0
    assert jitopt.counters["targets"]["cpp_partitions"] >= 1
