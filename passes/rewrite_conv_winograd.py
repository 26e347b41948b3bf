"""3x3 stride-1 convolutions with frozen weights to Winograd F(2x2, 3x3), weight transformed
once."""

from __future__ import annotations

import torch
import torch.fx as fx

from jitopt.ops import winograd_weight
from jitopt.passes.constants import add_constant, constant_value
from jitopt.passes.graph_facts import tensor_meta
from jitopt.passes.prepack_convolutions import is_frozen_cpu_conv2d, restore_output_layouts
from jitopt.passes.refresh_meta import refresh_meta_downstream

aten = torch.ops.aten
WINOGRAD = torch.ops.jitopt.conv3x3_winograd.default
# Channel multiples the CPU target's kernel takes: whole AVX-512 vectors of input channels,
# and whole 64-column register tiles of output channels.
IN_CHANNEL_MULTIPLE, OUT_CHANNEL_MULTIPLE = 16, 64


def rewrite_conv_winograd(gm: fx.GraphModule) -> int:
    """Rewrites a float32 CPU convolution with a frozen 3x3 weight, stride 1, padding 1, no
    dilation or groups, static sizes, input channels a multiple of 16 and output channels a
    multiple of 64, on an AVX-512 CPU, to jitopt::conv3x3_winograd over the weight
    transformed once (16 / 9 of its size). Its output is channels-last, as
    prepack_convolutions makes the others. Why: F(2x2, 3x3) computes each 2x2 block of
    outputs with 16 products per channel pair instead of 36, and the CPU target's kernel
    (codegen/cpp_winograd.py) runs ResNet's 3x3 layers 1.3-2x as fast as oneDNN's direct
    convolution at its peak here. Safe: an exact identity in real arithmetic; in float32
    (transform entries 0, +-1 and +-1/2, the weight transformed in float64) its error against
    a float64 convolution measured below the direct one's. One difference: an infinity or
    NaN in the input reaches the outputs of its whole 4x4 tile, up to one pixel farther than
    a direct convolution's 3x3 window takes it (inf - inf). Disable with
    options={"disabled_passes": ["rewrite_conv_winograd"]}."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return 0  # the kernel is written for AVX-512; the reference alone would be slower
    old_vals = {n: n.meta.get("val") for n in gm.graph.nodes}
    rewrites, changed = 0, set()
    for node in list(gm.graph.nodes):
        if not _takes(node):
            continue
        x, weight_node, bias_node = node.args[:3]
        weight = add_constant(gm, winograd_weight(constant_value(weight_node)),
                              node.name + "_winograd", node)
        with gm.graph.inserting_before(node):
            conv = gm.graph.call_function(WINOGRAD, (x, weight, bias_node, None, "none"))
        conv.meta["val"] = node.meta["val"].contiguous(memory_format=torch.channels_last)
        old_vals[conv] = node.meta["val"]
        node.replace_all_uses_with(conv)
        gm.graph.erase_node(node)
        changed.add(conv)
        rewrites += 1
    if changed:
        refresh_meta_downstream(gm, changed)
        restore_output_layouts(gm, old_vals)
    return rewrites


def _takes(node: fx.Node) -> bool:
    """A frozen float32 CPU 2-D convolution (prepack_convolutions' test) the kernel runs."""
    if not is_frozen_cpu_conv2d(node) or tensor_meta(node) is None:
        return False
    _, weight_node, _, stride, padding, dilation, _, _, groups = node.args
    weight = constant_value(weight_node)
    return (tuple(weight.shape[2:]) == (3, 3) and list(stride) == [1, 1]
            and list(padding) == [1, 1] and list(dilation) == [1, 1] and groups == 1
            and weight.shape[1] % IN_CHANNEL_MULTIPLE == 0
            and weight.shape[0] % OUT_CHANNEL_MULTIPLE == 0)
