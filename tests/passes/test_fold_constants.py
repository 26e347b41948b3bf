import torch
import torch.nn as nn
from aten_graphs import call, frozen_aten_graph, ops
from comparisons import assert_same

from jitopt.passes import eliminate_dead_code, fold_constants


class ScaledLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 4))
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        return x @ (self.weight * self.scale).t() + torch.arange(8.0)


def test_ops_on_weights_only_become_constants():
    model = ScaledLinear().eval()
    x = torch.randn(3, 4)
    gm, args = frozen_aten_graph(model, x)
    before = ops(gm)
    assert "aten.mul.Tensor" in before and "aten.t.default" in before
    assert fold_constants(gm) >= 2
    eliminate_dead_code(gm)
    gm.recompile()
    after = ops(gm)
    assert "aten.mul.Tensor" not in after and "aten.t.default" not in after
    with torch.no_grad():
        assert_same(call(gm, args)[0], model(x))


def test_ops_reading_an_input_are_not_folded():
    model = ScaledLinear().eval()
    gm, args = frozen_aten_graph(model, torch.randn(3, 4))
    fold_constants(gm)
    assert any(op in ops(gm) for op in ("aten.mm.default", "aten.addmm.default"))


def test_large_expansions_stay_in_the_graph():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.randn(64, 1))
            self.b = nn.Parameter(torch.randn(1, 64))

        def forward(self, x):
            return x + self.a * self.b  # a [64, 64] result from two 64-element weights

    model = Outer().eval()
    x = torch.randn(64, 64)
    gm, args = frozen_aten_graph(model, x)
    assert fold_constants(gm) == 0
    with torch.no_grad():
        assert_same(call(gm, args)[0], model(x))
