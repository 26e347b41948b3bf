import torch
import torch.nn as nn
from aten_graphs import call, frozen_aten_graph, ops
from comparisons import assert_same

from jitopt.passes import eliminate_dead_code, fold_constants, fold_linear_bn


def _linear_bn(bias: bool) -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 5, bias=bias), nn.BatchNorm1d(5))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 1.5)
    return model.eval()


def test_folds_bn_into_linear_after_weight_transpose_is_folded():
    for bias in (True, False):
        model = _linear_bn(bias)
        x = torch.randn(4, 6)
        gm, args = frozen_aten_graph(model, x)
        assert fold_linear_bn(gm) == 0, "needs the transposed weight folded to a constant first"
        fold_constants(gm)
        assert fold_linear_bn(gm) == 1
        eliminate_dead_code(gm)
        gm.recompile()
        assert ops(gm) == ["aten.addmm.default"]
        with torch.no_grad():
            assert_same(call(gm, args)[0], model(x), atol=1e-5)


def test_3d_input_bn_over_channels_is_not_folded():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.bn = nn.Linear(6, 6), nn.BatchNorm1d(4)

        def forward(self, x):  # BN over dim 1 of [N, 4, 6]: not the linear's features
            return self.bn(self.linear(x))

    gm, args = frozen_aten_graph(Model().eval(), torch.randn(2, 4, 6))
    fold_constants(gm)
    assert fold_linear_bn(gm) == 0
