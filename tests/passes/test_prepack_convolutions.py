"""2-D convolutions with frozen weights onto oneDNN, packed once, channels-last between them."""

import pytest
import torch
import torch.nn as nn
from comparisons import assert_same

import jitopt


def _compiled(model):
    return torch.compile(model, backend="jitopt", options={"on_error": "raise"})


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 8, 3), nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False),
    nn.Conv2d(4, 8, 3, padding=2, dilation=2), nn.Conv2d(4, 8, 1, groups=4),
    nn.Conv2d(4, 4, 3, padding=1, groups=4),
], ids=["plain", "strided-nobias", "dilated", "grouped-1x1", "depthwise"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_convolution_matches_eager_with_eager_output_strides(conv, memory_format):
    model = nn.Sequential(conv, nn.Hardswish(), nn.Conv2d(conv.out_channels, 3, 1)).eval()
    x = torch.randn(2, 4, 9, 9).contiguous(memory_format=memory_format)
    with torch.no_grad():
        got, want = _compiled(model)(x), model(x)
    assert_same(got, want, atol=1e-5)
    assert got.stride() == want.stride()
    assert jitopt.counters["passes"]["prepack_convolutions"] == 2


def test_transposed_convolution_and_training_stay_on_aten():
    model = nn.ConvTranspose2d(4, 3, 3).eval()
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        assert_same(_compiled(model)(x), model(x), atol=1e-5)
    assert jitopt.counters["passes"]["prepack_convolutions"] == 0

    conv = nn.Conv2d(4, 3, 3)
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    _compiled(conv)(x).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    conv(x2).sum().backward()
    assert_same(x.grad, x2.grad, atol=1e-5)
    assert jitopt.counters["passes"]["prepack_convolutions"] == 0
