import torch
import torch.nn as nn
from aten_graphs import call, frozen_aten_graph, ops
from comparisons import assert_same

from jitopt.passes import eliminate_dead_code, fold_conv_bn


def _conv_bn(bias: bool, affine: bool = True) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=bias), nn.BatchNorm2d(8, affine=affine))
    with torch.no_grad():  # non-trivial running statistics, as after training
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        if affine:
            model[1].weight.uniform_(0.5, 1.5)
            model[1].bias.uniform_(-1, 1)
    return model.eval()


def test_folds_bn_into_conv_with_and_without_bias():
    for bias in (True, False):
        for affine in (True, False):
            model = _conv_bn(bias, affine)
            x = torch.randn(2, 3, 10, 10)
            gm, args = frozen_aten_graph(model, x)
            assert fold_conv_bn(gm) == 1
            eliminate_dead_code(gm)
            gm.recompile()
            assert ops(gm) == ["aten.convolution.default"]
            with torch.no_grad():
                assert_same(call(gm, args)[0], model(x), atol=1e-5)


def test_keeps_bn_when_conv_output_has_another_user():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _conv_bn(True)

        def forward(self, x):
            y = self.inner[0](x)
            return self.inner[1](y) + y

    model = Branchy().eval()
    gm, args = frozen_aten_graph(model, torch.randn(1, 3, 6, 6))
    assert fold_conv_bn(gm) == 0
    assert "aten._native_batch_norm_legit_no_training.default" in ops(gm)


def test_transposed_conv_is_left_alone():
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    gm, args = frozen_aten_graph(model, torch.randn(1, 3, 5, 5))
    assert fold_conv_bn(gm) == 0
