"""Frozen linear weights onto oneDNN (mkldnn._linear_pointwise), packed once."""

import pytest
import torch
import torch.nn as nn
from aten_graphs import call, frozen_aten_graph, ops
from comparisons import assert_same

import jitopt
from jitopt.passes import eliminate_dead_code, fold_constants, prepack_linear_weights

LINEAR = "mkldnn._linear_pointwise.default"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 6)])
def test_linear_becomes_one_onednn_call(bias, shape):
    model = nn.Linear(6, 5, bias=bias).eval()
    x = torch.randn(*shape)
    gm, args = frozen_aten_graph(model, x)
    fold_constants(gm)
    assert prepack_linear_weights(gm) == 1
    eliminate_dead_code(gm)
    gm.recompile()
    assert LINEAR in ops(gm) and not any("addmm" in op or ".mm." in op for op in ops(gm))
    with torch.no_grad():
        assert_same(call(gm, args)[0], model(x), atol=1e-5)


def test_conv1d_style_weight_is_packed_from_its_transpose():
    """GPT-2's Conv1D: addmm(bias, x, W) with W stored [in, out], no transpose in the graph."""
    class Conv1D(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(5))

        def forward(self, x):
            return torch.addmm(self.bias, x.view(-1, 6), self.weight).view(*x.shape[:-1], 5)

    model, x = Conv1D().eval(), torch.randn(2, 3, 6)
    gm, args = frozen_aten_graph(model, x)
    assert prepack_linear_weights(gm) == 1
    gm.recompile()
    with torch.no_grad():
        assert_same(call(gm, args)[0], model(x), atol=1e-5)


def test_not_for_float64_or_scaled_addmm():
    def scaled(x, w, b):
        return torch.addmm(b, x, w, beta=0.5)

    model = nn.Linear(6, 5).double().eval()
    gm, _ = frozen_aten_graph(model, torch.randn(4, 6, dtype=torch.float64))
    fold_constants(gm)
    assert prepack_linear_weights(gm) == 0

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(5))

        def forward(self, x):
            return scaled(x, self.w, self.b)

    gm, _ = frozen_aten_graph(Scaled().eval(), torch.randn(4, 6))
    assert prepack_linear_weights(gm) == 0


def test_compiled_mlp_matches_eager_for_every_batch_size():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    fast = torch.compile(model, backend="jitopt", dynamic=True,  # (not the blocked kernel)
                         options={"disabled_passes": ["pack_linear_weight_blocks"]})
    with torch.no_grad():
        for rows in (1, 3, 17, 64):
            x = torch.randn(rows, 16)
            assert_same(fast(x), model(x), atol=1e-5)
    assert jitopt.counters["passes"]["prepack_linear_weights"] >= 2


def test_training_graphs_keep_aten_linear():
    model = nn.Linear(6, 5)
    x = torch.randn(4, 6, requires_grad=True)
    out = torch.compile(model, backend="jitopt")(x)
    out.sum().backward()
    assert jitopt.counters["passes"]["prepack_linear_weights"] == 0
    assert jitopt.counters["passes"]["pack_linear_weight_blocks"] == 0  # (nor the blocked one)
    x2 = x.detach().clone().requires_grad_()
    model(x2).sum().backward()
    assert_same(x.grad, x2.grad)


def test_graphs_over_the_same_weights_share_one_packed_copy():
    import importlib

    prepack = importlib.import_module("jitopt.passes.prepack_linear_weights")
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    fast = torch.compile(model, backend="jitopt",
                         options={"disabled_passes": ["pack_linear_weight_blocks"]})
    with torch.no_grad():
        for rows in (3, 1, 7):  # static 3, then 1 (specialized), then a symbolic batch
            x = torch.randn(rows, 16)
            assert_same(fast(x), model(x), atol=1e-5)
    assert jitopt.counters["graphs"]["compiled_inference"] >= 2
    owner, views = prepack._PACKED[id(model[0].weight)]
    assert owner() is model[0].weight and len(views) == 1
