"""Corner cases of calling convention and aliasing, each compared with eager."""

import pytest
import torch
import torch.nn as nn
from comparisons import assert_same

import jitopt


def compiled(fn, **kwargs):
    return torch.compile(fn, backend="jitopt", **kwargs)


@pytest.mark.parametrize("grad", [False, True])
def test_in_place_mutation_of_an_input(grad):
    def fn(x, y):
        x.add_(y)
        return x * 2

    x, y = torch.randn(4), torch.randn(4)
    x_eager, x_compiled = x.clone(), x.clone()
    with torch.set_grad_enabled(grad):
        expected = fn(x_eager, y)
        actual = compiled(fn)(x_compiled, y)
    assert_same(actual, expected)
    assert_same(x_compiled, x_eager)


def test_mutating_a_buffer_inside_forward():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls += 1
            return x * self.calls

    eager, comp = Counter(), Counter()
    fast = compiled(comp)
    with torch.no_grad():
        for _ in range(3):
            assert_same(fast(torch.ones(2)), eager(torch.ones(2)))
    assert comp.calls.item() == 3


def test_outputs_that_alias_inputs():
    def fn(x):
        return x, x.view(2, 2), x.t(), x + 1

    x = torch.randn(4)
    with torch.no_grad():
        out = compiled(fn)(x)
    assert_same(out[:2], (x, x.view(2, 2)))
    assert out[0].data_ptr() == x.data_ptr() and out[1].data_ptr() == x.data_ptr()
    x.mul_(3)  # a view returned by the compiled function sees the write, as in eager
    assert_same(out[1], x.view(2, 2))


def test_non_contiguous_inputs():
    def fn(a, b):
        return torch.relu(a @ b + b.sum(0))

    a = torch.randn(8, 6)[:, ::2]
    b = torch.randn(4, 3).t()
    with torch.no_grad():
        assert_same(compiled(fn)(a, b), fn(a, b))


def test_zero_size_tensors():
    def fn(x, w):
        return torch.softmax(x @ w, dim=-1).sum(0), x.mean(-1)

    x, w = torch.randn(0, 5), torch.randn(5, 3)
    with torch.no_grad():
        assert_same(compiled(fn)(x, w), fn(x, w))


def test_python_scalars():
    def fn(x, alpha: float, n: int, flag: bool):
        y = x * alpha + n
        return y.clamp(max=alpha) if flag else y

    x = torch.randn(5)
    fast = compiled(fn)
    with torch.no_grad():
        for alpha, n, flag in [(0.5, 2, True), (1.5, 3, False), (2.5, 4, True)]:
            assert_same(fast(x, alpha, n, flag), fn(x, alpha, n, flag))


def test_graph_break_inside_forward():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            y = torch.tanh(self.a(x))
            if y.sum() > 0:  # data-dependent branch: Dynamo breaks the graph here
                y = y * 2
            return self.b(y)

    model = Broken().eval()
    fast = compiled(model)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(3, 4)
            assert_same(fast(x), model(x))
    assert jitopt.counters["graphs"]["captured"] >= 2


def test_integer_and_bool_tensors():
    def fn(i, m):
        return (i * 3 + 1).masked_fill(m, 0), i.sum(), m.any()

    i, m = torch.arange(6).reshape(2, 3), torch.tensor([[True, False, True]] * 2)
    with torch.no_grad():
        assert_same(compiled(fn)(i, m), fn(i, m))


def test_a_compile_hands_the_memory_it_freed_back(monkeypatch):
    """Rounding and packing weights frees weight-sized temporaries that glibc would keep
    resident (BERT's int8-weight-only compile: 1163 MB above eager, 140 MB after a trim)."""
    from jitopt import compiler

    calls = []
    monkeypatch.setattr(compiler, "_malloc_trim", lambda: calls.append)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16)).eval()
    with torch.no_grad():
        torch.compile(model, backend="jitopt",
                      options={"quantize": "int8-weight-only"})(torch.randn(2, 16))
    assert calls == [0]


def test_a_quantize_mode_that_changes_nothing_says_so():
    """bf16 takes linears over float32 weights on CPU: asked of a bfloat16 model, it changes
    nothing, and the user hears it instead of getting the model's own precision silently."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval().to(torch.bfloat16)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="quantize='bf16' changed none of this graph's 1 matmul over"):
        with torch.no_grad():
            got = torch.compile(model, backend="jitopt", options={"quantize": "bf16"})(x)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x))


def test_attention_alone_is_not_a_layer_to_quantize(recwarn):
    def attention(q, k):
        return torch.softmax(q @ k.transpose(-1, -2), -1)

    q = torch.randn(2, 4, 8)
    torch.compile(attention, backend="jitopt", options={"quantize": "int8"})(q, q)
    assert not [w for w in recwarn if "changed none" in str(w.message)]
