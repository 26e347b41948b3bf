"""sink_views_through_pointwise: reshapes move past elementwise ops, so the ops between two
matmuls of a transformer block share one shape (and one fused kernel)."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from aten_graphs import call, frozen_aten_graph, ops
from reference_quantizer import quantize_int8_reference

import jitopt
from jitopt.passes import sink_views_through_pointwise

aten = torch.ops.aten


class FeedForward(nn.Module):
    """A transformer's MLP on [batch, tokens, width]: each Linear runs on the 2-D view."""

    def __init__(self, tanh: bool = False) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)
        self.tanh = tanh

    def forward(self, x):
        h = self.up(x)
        h = torch.tanh(h) * 0.5 + 1.0 if self.tanh else F.gelu(h)
        return self.down(h)


def _matmul_inputs(gm):
    """For each addmm, the op that produced its x."""
    return [n.args[1].target for n in gm.graph.nodes if n.target is aten.addmm.default]


def test_the_activation_moves_between_the_matmuls_and_the_views_go():
    model, x = FeedForward().eval(), torch.randn(2, 5, 32)
    gm, args = frozen_aten_graph(model, x)
    assert _matmul_inputs(gm)[1] is aten.view.default  # before: GELU ran on the 3-D view
    expected = call(gm, args)
    assert sink_views_through_pointwise(gm) == 1
    gm.recompile()
    assert _matmul_inputs(gm)[1] is aten.gelu.default
    assert ops(gm).count("aten.gelu.default") == 1
    torch.testing.assert_close(call(gm, args), expected, rtol=0, atol=0)


def test_chains_with_scalars_move_together():
    model, x = FeedForward(tanh=True).eval(), torch.randn(2, 5, 32)
    gm, args = frozen_aten_graph(model, x)
    expected = call(gm, args)
    assert sink_views_through_pointwise(gm) == 1
    gm.recompile()
    assert _matmul_inputs(gm)[1] is aten.add.Tensor
    torch.testing.assert_close(call(gm, args), expected, rtol=0, atol=0)


def test_an_operand_of_the_viewed_shape_stops_it():
    def fn(y, r):  # y [10, 32] viewed to r's [2, 5, 32]: a residual add stays 3-D
        return (y.view(2, 5, 32) + r).view(10, 32)

    gm = torch.fx.experimental.proxy_tensor.make_fx(fn)(torch.randn(10, 32),
                                                         torch.randn(2, 5, 32))
    assert sink_views_through_pointwise(gm) == 0


class ScaledLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(32, 32)
        self.shift = nn.Parameter(torch.randn(32))
        self.register_buffer("scale", torch.tensor(3.0))

    def forward(self, x):
        return ((self.linear(x) + self.shift) * self.scale).flatten(0, 1)


def test_bias_vectors_and_0d_tensors_move_with_it():
    gm, args = frozen_aten_graph(ScaledLinear().eval(), torch.randn(2, 5, 32))
    expected = call(gm, args)
    assert sink_views_through_pointwise(gm) == 1
    gm.recompile()
    assert ops(gm).count("aten.view.default") == 1  # x's, to 2-D for the matmul
    torch.testing.assert_close(call(gm, args), expected, rtol=0, atol=0)


def test_a_view_that_meets_no_inverse_stays():
    """Regression: moving LayerNorm's 3-D output's view to 2-D past the next layer's input
    steps carried them into the LayerNorm kernel and cut them off from their row max."""
    def fn(y):
        h = y.view(10, 32) * 2
        return h.abs().amax(-1)

    gm = torch.fx.experimental.proxy_tensor.make_fx(fn)(torch.randn(2, 5, 32))
    assert sink_views_through_pointwise(gm) == 0


def test_int8_feed_forward_runs_fewer_kernels_with_the_same_answer():
    torch.manual_seed(0)
    model, x = FeedForward().eval(), torch.randn(4, 16, 32)
    with torch.no_grad():
        report = jitopt.explain(model, x, quantize="int8")
        got = torch.compile(model, backend="jitopt", options={"quantize": "int8"})(x)
        want = quantize_int8_reference(model, x)(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    kernels = [p for p in report.graphs[0].aten[0].partitions if p["target"] == "cpp"]
    # x's quantization; up's epilogue + GELU + down's quantization; down's epilogue.
    assert len(kernels) == 3, kernels
