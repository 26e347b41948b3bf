"""ReLU and residual adds after a oneDNN (or Winograd) convolution become its post-ops."""

from __future__ import annotations

import torch
import torch.fx as fx

import jitopt.ops  # noqa: F401  (registers torch.ops.jitopt)
from jitopt.passes.graph_facts import is_op, only_user, tensor_meta
from jitopt.passes.prepack_convolutions import CONV

aten = torch.ops.aten
CONV_ADD = torch.ops.mkldnn._convolution_pointwise.binary
WINOGRAD = torch.ops.jitopt.conv3x3_winograd.default


def fuse_conv_epilogues(gm: fx.GraphModule) -> int:
    """Rewrites relu(conv(x)) to conv with a relu post-op, and [relu](conv(x) + other) to
    oneDNN's conv with an add (then relu) post-op, so the output is written once; the same
    for jitopt's Winograd convolution, whose kernel adds and clamps before it stores. Safe:
    the conv's result has no other user, `other` has the output's shape, dtype and
    channels-last layout (read as is), and add then relu is exactly what both compute."""
    fused = 0
    for node in list(gm.graph.nodes):
        if is_op(node, WINOGRAD) and node.args[3] is None and node.args[4] == "none":
            fused += _fuse_into_winograd(gm, node)
            continue
        if not (is_op(node, CONV) and node.args[7] == "none"):
            continue
        user = only_user(node)
        if user is None:
            continue
        if is_op(user, aten.relu.default):
            fused += _replace(gm, user, CONV, (*node.args[:7], "relu", [], ""), node)
        elif is_op(user, aten.add.Tensor) and not user.kwargs and (
                other := _addend(user, node)) is not None:
            last = only_user(user)
            relu = last if last is not None and is_op(last, aten.relu.default) else None
            x, weight, bias, padding, stride, dilation, groups = node.args[:7]
            args = (x, other, weight, bias, padding, stride, dilation, groups,
                    "add", None, "relu" if relu else None, [], None)
            fused += _replace(gm, relu or user, CONV_ADD, args, node, extra=[user] if relu else [])
    return fused


def _fuse_into_winograd(gm: fx.GraphModule, conv: fx.Node) -> int:
    """relu(conv) or [relu](conv + other) into the Winograd convolution's own arguments."""
    user = only_user(conv)
    x, weight, bias = conv.args[:3]
    if user is not None and is_op(user, aten.relu.default):
        return _replace(gm, user, WINOGRAD, (x, weight, bias, None, "relu"), conv)
    if user is None or not is_op(user, aten.add.Tensor) or user.kwargs or (
            other := _addend(user, conv)) is None:
        return 0
    last = only_user(user)
    relu = last if last is not None and is_op(last, aten.relu.default) else None
    args = (x, weight, bias, other, "relu" if relu else "none")
    return _replace(gm, relu or user, WINOGRAD, args, conv, extra=[user] if relu else [])


def _addend(add: fx.Node, conv: fx.Node) -> fx.Node | None:
    """The other operand of `conv + other`, when the convolution's kernel (oneDNN's or the
    Winograd one) can add it as is."""
    a, b = add.args
    other = b if a is conv else a if b is conv else None
    if not isinstance(other, fx.Node) or other is conv:
        return None
    want, got = tensor_meta(conv), tensor_meta(other)
    if got is None or got.shape != want.shape or got.dtype != want.dtype:
        return None
    return other if got.is_contiguous(memory_format=torch.channels_last) else None


def _replace(gm: fx.GraphModule, last: fx.Node, target, args: tuple, conv: fx.Node,
             extra: list[fx.Node] = ()) -> int:
    with gm.graph.inserting_before(last):
        new = gm.graph.call_function(target, args)
    new.meta["val"] = last.meta["val"]
    last.replace_all_uses_with(new)
    for dead in (last, *extra, conv):
        gm.graph.erase_node(dead)
    return 1

