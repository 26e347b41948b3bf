"""group_fusions: which nodes share a kernel. Each test states the groups it expects."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from aten_graphs import frozen_aten_graph

from jitopt.passes.group_fusions import GROUP_KEY, group_fusions


class Fn(nn.Module):
    def __init__(self, fn, *params):
        super().__init__()
        self.fn = fn
        self.params = nn.ParameterList(params)

    def forward(self, *args):
        return self.fn(*args, *self.params)


def groups(fn, *inputs, params=()) -> list[list[str]]:
    """The fused groups of `fn`'s frozen ATen graph, as lists of op names in graph order."""
    gm, _ = frozen_aten_graph(Fn(fn, *params), *inputs)
    count = group_fusions(gm)
    found: dict[int, list[str]] = {}
    for node in gm.graph.nodes:
        if GROUP_KEY in node.meta:
            name = getattr(node.target, "__name__", str(node.target))
            found.setdefault(node.meta[GROUP_KEY], []).append(name)
    assert len(found) == count
    return list(found.values())


def test_pointwise_chain_is_one_group():
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    assert groups(lambda x, y: torch.sigmoid((x * 1.5 + y).relu() - 0.25) * y, x, y) == [
        ["mul.Tensor", "add.Tensor", "relu.default", "sub.Tensor", "sigmoid.default",
         "mul.Tensor"]]


def test_softmax_and_layer_norm_are_one_kernel_each():
    x = torch.randn(8, 16)
    assert groups(lambda x: torch.softmax(x * 2, -1), x) == [["mul.Tensor", "_softmax.default"]]
    w, b = nn.Parameter(torch.randn(16)), nn.Parameter(torch.randn(16))
    (group,) = groups(lambda x, w, b: F.layer_norm(x, (16,), w, b).relu(), x, params=(w, b))
    assert group == ["native_layer_norm.default", "getitem", "relu.default"]


def test_matmul_stays_a_library_call_and_its_epilogue_fuses():
    w = nn.Parameter(torch.randn(16, 16))
    found = groups(lambda x, w: torch.tanh(x @ w + 1), torch.randn(8, 16), params=(w,))
    assert found == [["add.Tensor", "tanh.default"]]


def test_no_group_through_an_outside_node():
    """b reads a and mm(a): fusing a with b would need mm inside the kernel (a cycle)."""
    w = nn.Parameter(torch.randn(16, 16))

    def fn(x, w):
        a = x.relu()
        return (a @ w) + a

    assert groups(fn, torch.randn(16, 16), params=(w,)) == [["relu.default"], ["add.Tensor"]]


def test_horizontal_fusion_of_readers_of_one_input():
    def fn(x):
        return x.sin(), x.cos()

    assert groups(fn, torch.randn(8, 16)) == [["sin.default", "cos.default"]]


def test_reduction_over_a_middle_dim_stays_on_aten():
    assert groups(lambda x: x.sum(1).relu(), torch.randn(4, 8, 16)) == [["relu.default"]]


def test_view_feeding_only_a_matmul_stays_outside():
    w = nn.Parameter(torch.randn(16, 16))

    def fn(x, w):
        return (x.relu().view(2, 4, 16) @ w).sigmoid()

    # The view after the matmul is a strided read of the kernel's input: it joins for free.
    assert groups(fn, torch.randn(8, 16), params=(w,)) == [
        ["relu.default"], ["_unsafe_view.default", "sigmoid.default"]]
