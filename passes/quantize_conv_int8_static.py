"""2-D convolutions with calibrated inputs to uint8 x int8 oneDNN convolutions
(`quantize="int8-static"`)."""

from __future__ import annotations

import torch
import torch.fx as fx

from jitopt.passes.constants import add_constant, constant_value
from jitopt.passes.frozen_linears import record_layer
from jitopt.passes.graph_facts import is_op, tensor_meta
from jitopt.passes.prepack_convolutions import is_frozen_cpu_conv2d
from jitopt.passes.quantize_linear_int8 import quantize_per_channel, weight_sqnr_db
from jitopt.passes.refresh_meta import refresh_meta_downstream, set_meta

aten = torch.ops.aten
QCONV = torch.ops.onednn.qconv2d_pointwise.default
UINT8_MAX = 255


def quantize_conv_int8_static(gm: fx.GraphModule) -> int:
    """Rewrites aten.convolution (2-D, float32 on CPU, frozen weight) whose input carries a
    calibrated range (node.meta["input_range"], from `jitopt.calibrate`) to
    onednn.qconv2d_pointwise: the input rounded to uint8 with the range's fixed scale and
    zero point (a pointwise step that fuses with the ops before it), the weight to int8 per
    output channel and packed once, int32 accumulation, a float32 output with bias (and a
    following ReLU) applied in the same call. Not exact: inputs outside the calibrated range
    are clipped to it, and both operands are rounded; jitopt reports each layer's weight and
    output SQNR. Convolutions without a range, or named in gm.meta["quantize_keep"] (an
    accuracy budget's verdict), stay fp32, recorded with the reason."""
    if not torch.backends.mkldnn.is_available():
        return 0
    rewrites, changed = 0, set()
    for node in list(gm.graph.nodes):
        if not is_frozen_cpu_conv2d(node):
            continue
        weight = constant_value(node.args[1])
        kept = gm.meta.get("quantize_keep", {}).get(node.name)
        if "input_range" not in node.meta:
            kept = ("no calibrated input range (run jitopt.calibrate(model, batches) before "
                    "compiling)")
        if kept is not None:
            record_layer(gm, node, weight.reshape(weight.shape[0], -1), "fp32 (kept)",
                         reason=kept)
            continue
        conv = _quantized_conv(gm, node, weight, *activation_qparams(*node.meta["input_range"]))
        changed.add(conv)
        rewrites += 1
    if changed:
        refresh_meta_downstream(gm, changed)
    return rewrites


def activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric uint8 (scale, zero point) covering [lo, hi] widened to include 0, so that
    zero (padding, ReLU's floor) is exact."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / UINT8_MAX, 1e-8)
    return scale, int(min(max(round(-lo / scale), 0), UINT8_MAX))


def fake_quantize_activation(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """What the rewritten graph computes for x, back in float: the eager reference."""
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, UINT8_MAX)
    return (q - zero_point) * scale


def _quantized_conv(gm: fx.GraphModule, node: fx.Node, weight: torch.Tensor, x_scale: float,
                    x_zp: int) -> fx.Node:
    x, _, bias_node, stride, padding, dilation, _, _, groups = node.args
    rows = quantize_per_channel(weight.reshape(weight.shape[0], -1))  # int8, scale [Cout]
    wq, w_scale = rows[0].reshape(weight.shape), rows[1]
    packed = torch.ops.onednn.qconv_prepack(wq, w_scale, x_scale, x_zp, stride, padding,
                                            dilation, groups, list(tensor_meta(x).shape))
    consts = [add_constant(gm, value, node.name + suffix, node) for value, suffix in (
        (packed, "_int8_packed"), (w_scale, "_int8_scale"),
        (torch.zeros(weight.shape[0], dtype=torch.int32), "_int8_zero_point"))]
    relu = _only_relu_user(node)
    graph = gm.graph
    with graph.inserting_before(node):
        steps = _quantize_activation(graph, x, x_scale, x_zp)
        xq = steps[-1]
        conv = graph.call_function(QCONV, (
            xq, x_scale, x_zp, *consts, bias_node, stride, padding, dilation, groups, 1.0, 0,
            torch.float32, "relu" if relu is not None else "none", [], ""))
    set_meta(steps, tensor_meta(x).fake_mode)
    # oneDNN's output is channels-last (the packed weight has no fake counterpart to run the
    # op's meta function on); downstream meta is refreshed from it.
    conv.meta["val"] = node.meta["val"].contiguous(memory_format=torch.channels_last)
    (relu or node).replace_all_uses_with(conv)
    if relu is not None:
        graph.erase_node(relu)
    graph.erase_node(node)
    flat = weight.reshape(weight.shape[0], -1)  # [Cout, Cin/groups * kh * kw]
    record_layer(gm, node, flat, "int8-static",
                 weight_sqnr_db=round(weight_sqnr_db(flat, *rows), 2),
                 input_range=[round(v, 6) for v in node.meta["input_range"]],
                 input_scale=x_scale, input_zero_point=x_zp,
                 fused="relu" if relu is not None else None)
    return conv


def _only_relu_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and is_op(users[0], aten.relu.default) else None


def _quantize_activation(graph: fx.Graph, x: fx.Node, scale: float, zero_point: int
                         ) -> list[fx.Node]:
    """uint8(clamp(round(x / scale) + zero_point, 0, 255)) as ATen pointwise ops: the new
    nodes in order, the uint8 value last."""
    scaled = graph.call_function(aten.div.Tensor, (x, scale))
    rounded = graph.call_function(aten.round.default, (scaled,))
    shifted = graph.call_function(aten.add.Tensor, (rounded, zero_point))
    clamped = graph.call_function(aten.clamp.default, (shifted, 0, UINT8_MAX))
    return [scaled, rounded, shifted, clamped,
            graph.call_function(aten._to_copy.default, (clamped,), {"dtype": torch.uint8})]

