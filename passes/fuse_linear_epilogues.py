"""Activations after a oneDNN linear become its post-op, and after a float32 blocked-weight
linear its epilogue."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

from jitopt.ops import blocked_linear_args
from jitopt.passes.graph_facts import is_op, only_user, tensor_meta
from jitopt.passes.prepack_linear_weights import LINEAR

BLOCKED_LINEAR = torch.ops.jitopt.linear_blocked_weight.default

aten = torch.ops.aten


def _gelu(node: fx.Node) -> tuple[str, str]:
    return "gelu", node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")


# activation op -> (oneDNN post-op name, algorithm) for that node
POST_OPS = {
    aten.relu.default: lambda n: ("relu", ""),
    aten.gelu.default: _gelu,
    aten.silu.default: lambda n: ("swish", ""),
    aten.tanh.default: lambda n: ("tanh", ""),
    aten.sigmoid.default: lambda n: ("sigmoid", ""),
}
# activation op -> jitopt::linear_blocked_weight's name (jitopt/ops.py) for that node
BLOCKED_ACTIVATIONS = {
    aten.relu.default: lambda n: "relu",
    aten.gelu.default: lambda n: "gelu_tanh" if _gelu(n)[1] == "tanh" else "gelu",
    aten.silu.default: lambda n: "silu",
    aten.tanh.default: lambda n: "tanh",
    aten.sigmoid.default: lambda n: "sigmoid",
}
VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def fuse_linear_epilogues(gm: fx.GraphModule) -> int:
    """Rewrites act(linear(x)) (a view may sit between) to one linear with `act` applied as
    the output is written, once: a oneDNN linear's post-op, or a float32 blocked-weight
    linear's activation (the CPU target's kernel applies it). Safe: the linear's result has
    no other user, and a view commutes with an elementwise activation."""
    fused = 0
    for node in list(gm.graph.nodes):
        args = _fused_args(node)
        if args is None:
            continue
        view, act = _single_activation_user(node)
        if act is None:
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(node.target, args(act))
        new.meta["val"] = node.meta["val"]
        result = new
        if view is not None:
            with gm.graph.inserting_after(new):
                result = gm.graph.call_function(view.target, (new, *view.args[1:]), view.kwargs)
            result.meta["val"] = view.meta["val"]
        act.replace_all_uses_with(result)
        for dead in (act, view, node):
            if dead is not None:
                gm.graph.erase_node(dead)
        fused += 1
    return fused


def _fused_args(node: fx.Node) -> Callable[[fx.Node], tuple] | None:
    """For a linear without an activation yet: activation node -> the fused call's args."""
    if is_op(node, LINEAR) and node.args[3] == "none":
        def onednn(act: fx.Node) -> tuple:
            attr, algorithm = POST_OPS[act.target](act)
            return (*node.args[:3], attr, [], algorithm)
        return onednn
    if not is_op(node, BLOCKED_LINEAR):
        return None
    x, weight, n, bias, activation = blocked_linear_args(node.args)
    if activation == "none":
        value = tensor_meta(weight)
        if value is not None and value.dtype == torch.float32:  # (half weights: no epilogue)
            return lambda act: (x, weight, n, bias, BLOCKED_ACTIVATIONS[act.target](act))
    return None


def _single_activation_user(node: fx.Node) -> tuple[fx.Node | None, fx.Node | None]:
    """(view or None, activation) when `node` flows only into one activation, else (None, None)."""
    view = None
    user = only_user(node)
    if user is not None and is_op(user, *VIEWS):
        view, user = user, only_user(user)
    if user is None or user.target not in POST_OPS or user.args[0] is not (view or node):
        return None, None
    return view, user

