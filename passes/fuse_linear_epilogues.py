"""Activations after a oneDNN linear become its post-op."""

from __future__ import annotations

import torch
import torch.fx as fx

from jitopt.passes.graph_facts import is_op, only_user
from jitopt.passes.prepack_linear_weights import LINEAR

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
VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def fuse_linear_epilogues(gm: fx.GraphModule) -> int:
    """Rewrites act(linear(x)) (a view may sit between) to one oneDNN linear with `act` as its
    post-op, so the output is written once. Safe: the linear's result has no other user, and a
    view commutes with an elementwise activation."""
    fused = 0
    for node in list(gm.graph.nodes):
        if not (is_op(node, LINEAR) and node.args[3] == "none"):
            continue
        view, act = _single_activation_user(node)
        if act is None:
            continue
        attr, algorithm = POST_OPS[act.target](act)
        x, weight, bias = node.args[:3]
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(LINEAR, (x, weight, bias, attr, [], algorithm))
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


def _single_activation_user(node: fx.Node) -> tuple[fx.Node | None, fx.Node | None]:
    """(view or None, activation) when `node` flows only into one activation, else (None, None)."""
    view = None
    user = only_user(node)
    if user is not None and is_op(user, *VIEWS):
        view, user = user, only_user(user)
    if user is None or user.target not in POST_OPS or user.args[0] is not (view or node):
        return None, None
    return view, user

