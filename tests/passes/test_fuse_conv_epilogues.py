"""ReLU and residual adds after a oneDNN convolution become its post-ops."""

import torch
import torch.nn as nn
from comparisons import assert_same

import jitopt


class Residual(nn.Module):
    """A ResNet basic block: conv-relu, conv + shortcut (identity or 1x1 conv), relu."""

    def __init__(self, downsample: bool, final_relu: bool = True):
        super().__init__()
        cout, stride = (8, 2) if downsample else (4, 1)
        self.conv1 = nn.Conv2d(4, cout, 3, stride, 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.down = nn.Conv2d(4, cout, 1, stride) if downsample else None
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.final_relu = final_relu

    def forward(self, x):
        x = self.stem(x)
        y = self.conv2(torch.relu(self.conv1(x)))
        y = y + (self.down(x) if self.down is not None else x)
        return torch.relu(y) if self.final_relu else y


def _run(model, x):
    with torch.no_grad():
        got = torch.compile(model, backend="jitopt", options={"on_error": "raise"})(x)
        want = model(x)
    assert_same(got, want, atol=1e-5)
    assert got.stride() == want.stride()
    return jitopt.counters["passes"]["fuse_conv_epilogues"]


def test_relu_and_residual_add_become_post_ops():
    # conv1 + relu, and conv2 + shortcut + relu
    assert _run(Residual(downsample=False).eval(), torch.randn(2, 3, 8, 8)) == 2


def test_downsample_shortcut_and_add_without_relu():
    # conv1 + relu; conv2 + (1x1 conv shortcut), no relu after
    assert _run(Residual(downsample=True, final_relu=False).eval(), torch.randn(2, 3, 8, 8)) == 2


def test_shortcut_in_another_layout_is_added_by_aten():
    class AddInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):  # x arrives contiguous: oneDNN's add post-op would misread it
            return torch.relu(self.conv(x) + x)

    assert _run(AddInput().eval(), torch.randn(2, 4, 6, 6)) == 0
