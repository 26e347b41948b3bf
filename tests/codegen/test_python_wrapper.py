import expecttest
import torch
import torch.nn as nn

import jitopt


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x, scale: int):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean((2, 3)) * scale), y.shape[0] + scale


def _wrapper_source(fn, *args, **options) -> str:
    with torch.no_grad():
        report = jitopt.explain(fn, *args, **options)
    (graph,) = report.graphs
    (aten_graph,) = graph.aten
    return aten_graph.wrapper_source


class TestWrapperSource(expecttest.TestCase):
    def test_conv_bn_linear_block(self):
        torch.manual_seed(0)
        source = _wrapper_source(Block().eval(), torch.randn(2, 3, 6, 6), 3)
        self.assertExpectedInline(source, """\
# jitopt inference graph: 2 ops, 2 compiled partitions
_convolution_pointwise_default = aten_op("mkldnn::_convolution_pointwise.default")
mean_dim = aten_op("aten::mean.dim")


def run(args):
    arg0_1, arg1_1, arg2_1, arg3_1, arg4_1, arg5_1, arg6_1, arg7_1 = args
    args.clear()
    del arg0_1, arg2_1, arg3_1, arg4_1, arg5_1, arg6_1, arg7_1
    _convolution_pointwise_default_1 = _convolution_pointwise_default(arg1_1, folded_convolution_packed, folded_convolution_bias, [0, 0], [1, 1], [1, 1], 1, 'relu', [], '')
    del arg1_1
    mean = mean_dim(_convolution_pointwise_default_1, [2, 3])
    del _convolution_pointwise_default_1
    fused_0 = cpp_fused_0(mean)
    del mean
    fused_1 = cpp_fused_1(fused_0, folded_addmm_blocks, frozen_arg7_1)
    del fused_0
    return (fused_1,)
""")

    def test_symbolic_sizes_are_arguments(self):
        def fn(x):
            return torch.sigmoid(x) * x, x.shape[0] * 2

        x = torch.randn(4, 3)
        torch._dynamo.mark_dynamic(x, 0)
        self.assertExpectedInline(_wrapper_source(fn, x), """\
# jitopt inference graph: 1 ops, 1 compiled partitions


def run(args):
    arg0_1, arg1_1 = args
    args.clear()
    fused_0 = cpp_fused_0(arg1_1)
    del arg1_1
    mul_1 = arg0_1 * 2
    del arg0_1
    return (fused_0, mul_1)
""")
