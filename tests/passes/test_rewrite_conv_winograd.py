"""3x3 stride-1 convolutions to Winograd F(2x2, 3x3): which ones, and eager's values."""

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from comparisons import assert_same

import jitopt
from jitopt.ops import winograd_weight
from jitopt.passes.rewrite_conv_winograd import WINOGRAD, rewrite_conv_winograd

# The pass takes convolutions only where its kernel runs; the op's reference runs anywhere.
avx512 = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                            reason="the Winograd kernel is written for AVX-512")


def _run(model, x, **options):
    model.eval()
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, backend="jitopt",
                            options={"on_error": "raise", **options})(x)
    return got, want


class Block(nn.Module):
    """A ResNet basic block: conv, ReLU, conv, + input, ReLU."""

    def __init__(self, channels: int, bias: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=bias)

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)


@avx512
@pytest.mark.parametrize("shape", [(2, 64, 8, 8), (1, 64, 7, 7), (3, 64, 5, 9), (1, 64, 1, 1)],
                         ids=["even", "odd", "uneven", "one-pixel"])
@pytest.mark.parametrize("bias", [True, False])
def test_residual_block_matches_eager(shape, bias):
    # channels-last, as a previous convolution leaves it: the residual add is then fused
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    got, want = _run(Block(shape[1], bias), x)
    assert_same(got, want, atol=1e-5, rtol=1e-4)
    # the graph output keeps eager's layout (a size-1 dim's stride is free)
    assert all(got.stride(d) == want.stride(d) for d in range(4) if got.shape[d] > 1)
    assert jitopt.counters["passes"]["rewrite_conv_winograd"] == 2
    assert jitopt.counters["kernels"]["cpp_winograd"] == 2
    # relu into the first, add + relu into the second: nothing left between them
    assert jitopt.counters["passes"]["fuse_conv_epilogues"] == 2


@avx512
@pytest.mark.parametrize("shape", [(2, 320, 5, 7), (1, 320, 4, 4)])
def test_large_weights_run_the_phased_form(shape):
    """320 x 320 channels: too big a weight to run per block of tiles (cpp_winograd.py)."""
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    got, want = _run(Block(320), x)
    assert_same(got, want, atol=2e-5, rtol=1e-4)
    assert jitopt.counters["kernels"]["cpp_winograd"] == 2


@avx512
def test_input_channels_16_output_128_and_channels_last_input():
    model = nn.Sequential(nn.Conv2d(16, 128, 3, padding=1), nn.Sigmoid())
    x = torch.randn(2, 16, 10, 6).contiguous(memory_format=torch.channels_last)
    got, want = _run(model, x)
    assert_same(got, want, atol=1e-5, rtol=1e-4)
    assert jitopt.counters["kernels"]["cpp_winograd"] == 1


@pytest.mark.parametrize("conv", [
    nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.Conv2d(64, 64, 3), nn.Conv2d(64, 64, 1),
    nn.Conv2d(64, 64, 3, padding=2, dilation=2), nn.Conv2d(64, 64, 3, padding=1, groups=2),
    nn.Conv2d(8, 64, 3, padding=1), nn.Conv2d(64, 32, 3, padding=1)],
    ids=["strided", "no-padding", "1x1", "dilated", "grouped", "8-in", "32-out"])
def test_other_convolutions_stay_on_onednn(conv):
    got, want = _run(conv, torch.randn(1, conv.in_channels, 9, 9))
    assert_same(got, want, atol=1e-5, rtol=1e-4)
    assert jitopt.counters["passes"]["rewrite_conv_winograd"] == 0


def test_dynamic_sizes_float64_training_and_no_cpp_target_stay():
    conv = nn.Conv2d(16, 64, 3, padding=1)
    x = torch.randn(2, 16, 8, 8)
    torch._dynamo.mark_dynamic(x, 2)
    assert_same(*_run(conv, x), atol=1e-5, rtol=1e-4)
    assert_same(*_run(conv.double(), torch.randn(1, 16, 6, 6).double()), atol=1e-9)
    conv.float()
    assert_same(*_run(conv, torch.randn(1, 16, 6, 6), targets=("aten",)), atol=1e-5)
    assert jitopt.counters["passes"]["rewrite_conv_winograd"] == 0

    x = torch.randn(1, 16, 6, 6, requires_grad=True)
    torch.compile(conv, backend="jitopt")(x).sum().backward()
    grad, x.grad = x.grad.clone(), None
    conv(x).sum().backward()
    assert jitopt.counters["passes"]["rewrite_conv_winograd"] == 0
    assert_same(grad, x.grad, atol=1e-5)


def test_reference_op_matches_a_float64_convolution():
    """The op's ATen reference (what runs while the kernel builds) against float64."""
    x, g, b, other = (torch.randn(2, 16, 7, 5), torch.randn(64, 16, 3, 3), torch.randn(64),
                      torch.randn(2, 64, 7, 5))
    got = torch.ops.jitopt.conv3x3_winograd(x, winograd_weight(g), b, other, "relu")
    want = torch.relu(F.conv2d(x.double(), g.double(), b.double(), padding=1) + other.double())
    assert_same(got, want.float(), atol=2e-5, rtol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last)


@avx512
def test_graph_before_and_after():
    weight = torch.randn(64, 16, 3, 3)
    root = nn.Module()
    root.register_buffer("frozen_w", weight)
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(1, 16, 6, 6)
    w = graph.get_attr("frozen_w")
    conv = graph.call_function(torch.ops.aten.convolution.default,
                               (x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1))
    conv.meta["val"] = torch.empty(1, 64, 6, 6)
    graph.output(conv)
    gm = fx.GraphModule(root, graph)
    assert rewrite_conv_winograd(gm) == 1
    (node,) = [n for n in gm.graph.nodes if n.target is WINOGRAD]
    transformed = getattr(gm, node.args[1].target)
    assert transformed.shape == (16, 16, 64)
    assert torch.equal(transformed, winograd_weight(weight))
    assert node.args[2:] == (None, None, "none")
    assert node.meta["val"].is_contiguous(memory_format=torch.channels_last)
