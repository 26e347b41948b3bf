"""Generated C++ kernels end to end: formed groups, symbolic sizes, layouts, memory plan."""

import torch
import torch.nn as nn
import torch.nn.functional as F

import jitopt


def _compiled(fn, **kwargs):
    return torch.compile(fn, backend="jitopt", **kwargs)


def test_pointwise_chain_runs_as_one_kernel():
    def fn(x, y):
        return torch.sigmoid((x * 1.5 + y).relu() - 0.25) * y

    x, y = torch.randn(33, 65), torch.randn(33, 65)
    torch.testing.assert_close(_compiled(fn)(x, y), fn(x, y))
    assert jitopt.counters["targets"]["cpp_partitions"] == 1
    assert jitopt.counters["passes"]["group_fusions"] == 1


def test_symbolic_sizes_one_compile_serves_every_shape():
    def fn(x, w, b):
        return F.layer_norm(torch.softmax(x, -1) * 2 + x, (x.shape[-1],), w, b).relu()

    compiled = _compiled(fn, dynamic=True)
    for rows, cols in [(3, 8), (17, 8), (5, 33), (64, 1000)]:
        x, w, b = torch.randn(rows, cols), torch.randn(cols), torch.randn(cols)
        torch.testing.assert_close(compiled(x, w, b), fn(x, w, b))
    assert jitopt.counters["graphs"]["compiled_inference"] == 1
    assert jitopt.counters["targets"]["cpp_partitions"] == 1


def test_non_contiguous_inputs_are_checked_not_trusted():
    def fn(x, y):
        return x * y + 1

    compiled = _compiled(fn)
    x, y = torch.randn(16, 24), torch.randn(16, 24)
    torch.testing.assert_close(compiled(x, y), fn(x, y))
    # Same shapes, other strides: either a recompile or the launcher's relayout; never the
    # old strides applied to new memory.
    xt = torch.randn(24, 16).t()
    torch.testing.assert_close(compiled(xt, y), fn(xt, y))
    sliced = torch.randn(16, 48)[:, ::2]
    torch.testing.assert_close(compiled(sliced, y), fn(sliced, y))


def test_broadcast_views_and_storage_offsets():
    def fn(x, bias, table):
        row = table[3]                     # select: a storage offset into the input
        return (x.t() + bias).tanh() * row[:8].unsqueeze(1)

    x, bias, table = torch.randn(16, 8), torch.randn(16), torch.randn(10, 20)
    torch.testing.assert_close(_compiled(fn)(x, bias, table), fn(x, bias, table))
    assert jitopt.counters["targets"]["cpp_partitions"] == 1


def test_half_types_are_stored_as_such():
    def fn(x, y):
        return (x.float() * 2).to(y.dtype) + y

    for dtype in (torch.float16, torch.bfloat16):
        x, y = torch.randn(40, dtype=dtype), torch.randn(40, dtype=dtype)
        out = _compiled(fn)(x, y)
        assert out.dtype == dtype
        torch.testing.assert_close(out, fn(x, y))


def test_memory_plan_reuses_dead_intermediates():
    # Hardswish: no oneDNN post-op takes it, so each one is a generated kernel.
    model = nn.Sequential(nn.Linear(32, 32), nn.Hardswish(), nn.Linear(32, 32), nn.Hardswish(),
                          nn.Linear(32, 32), nn.Hardswish()).eval()
    x = torch.randn(8, 32)
    with torch.no_grad():
        report = jitopt.explain(model, x)
        source = report.graphs[0].aten[0].wrapper_source
        assert "out0=fused_0" in source and "out0=fused_1" in source
        torch.testing.assert_close(_compiled(model)(x), model(x))


def test_graph_output_and_viewed_buffers_are_not_reused():
    def fn(x, w):
        a = x.sigmoid()
        view = a.view(-1)                  # an alias of a: a's buffer must stay untouched
        b = (a @ w).tanh()
        return b, view

    x, w = torch.randn(8, 8), torch.randn(8, 8)
    report = jitopt.explain(fn, x, w)
    assert "out0=" not in report.graphs[0].aten[0].wrapper_source
    for got, want in zip(_compiled(fn)(x, w), fn(x, w)):
        torch.testing.assert_close(got, want)


def test_training_graphs_still_match_eager_gradients():
    def fn(x):
        return (torch.softmax(x * 3, -1) * x.sigmoid()).sum()

    x = torch.randn(6, 10, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    _compiled(fn)(x).backward()
    fn(x2).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert jitopt.counters["targets"]["cpp_partitions"] >= 2


def test_buffer_behind_an_unsafe_view_is_not_reused():
    """Regression: aten._unsafe_view (after a batched matmul) has no alias annotation, and the
    memory plan handed the matmul's buffer to a kernel while the view was still to be read."""
    def fn(a, b, c, e):
        x = a @ b                          # mm + _unsafe_view
        y = torch.sigmoid(c) * 2           # a kernel output with mm's layout
        return y, torch.bmm(x, e)

    args = torch.randn(2, 4, 8), torch.randn(8, 16), torch.randn(8, 16), torch.randn(2, 16, 3)
    with torch.no_grad():
        for got, want in zip(_compiled(fn)(*args), fn(*args)):
            torch.testing.assert_close(got, want)


def test_memory_plan_keys_buffers_by_device():
    """A dead buffer on another device never becomes a CPU kernel's output: the device is
    part of the layout the plan matches on."""
    import torch.fx as fx

    from jitopt.codegen.memory_plan import _donor_layout

    graph = fx.Graph()
    x = graph.placeholder("x")
    mm = graph.call_function(torch.ops.aten.mm.default, (x, x))
    mm.meta["val"] = torch.empty(8, 8, device="meta")
    graph.output(graph.call_function(torch.ops.aten.relu.default, (mm,)))
    assert _donor_layout(mm, {}) == ((8, 8), (8, 1), torch.float32, "meta")
