import torch
import torch.fx as fx
from aten_graphs import ops

from jitopt.passes import eliminate_common_subexpressions, eliminate_dead_code

aten = torch.ops.aten


def _graph(build) -> fx.GraphModule:
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(3, device="meta")
    graph.output(build(graph, x))
    return fx.GraphModule(torch.nn.Module(), graph)


def test_repeated_pure_ops_merge():
    def build(g, x):
        a = g.call_function(aten.sin.default, (x,))
        b = g.call_function(aten.sin.default, (x,))
        return g.call_function(aten.add.Tensor, (a, b))

    gm = _graph(build)
    assert eliminate_common_subexpressions(gm) == 1
    gm.recompile()
    x = torch.randn(3)
    torch.testing.assert_close(gm(x), x.sin() * 2)


def test_reads_across_a_mutation_do_not_merge():
    def build(g, x):
        a = g.call_function(aten.sin.default, (x,))
        g.call_function(aten.add_.Tensor, (x, 1.0))
        b = g.call_function(aten.sin.default, (x,))
        return (a, b)

    gm = _graph(build)
    assert eliminate_common_subexpressions(gm) == 0
    x = torch.randn(3)
    a, b = gm(x.clone())
    torch.testing.assert_close(b, (x + 1).sin())


def test_random_ops_and_different_scalars_do_not_merge():
    def build(g, x):
        r1 = g.call_function(aten.rand_like.default, (x,))
        r2 = g.call_function(aten.rand_like.default, (x,))
        m1 = g.call_function(aten.mul.Tensor, (x, 1))
        m2 = g.call_function(aten.mul.Tensor, (x, 1.0))
        m3 = g.call_function(aten.mul.Tensor, (x, True))
        return (r1, r2, m1, m2, m3)

    gm = _graph(build)
    assert eliminate_common_subexpressions(gm) == 0


def test_dead_code_is_swept_but_mutations_stay():
    def build(g, x):
        g.call_function(aten.cos.default, (x,))  # unused
        g.call_function(aten.add_.Tensor, (x, 1.0))  # unused but writes x
        return x

    gm = _graph(build)
    assert eliminate_dead_code(gm) == 1
    assert ops(gm) == ["aten.add_.Tensor"]
