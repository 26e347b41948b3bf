"""Recompute node.meta["val"] downstream of nodes whose output layout a pass changed."""

from __future__ import annotations

import torch
import torch.fx as fx

from jitopt.passes.constants import constant_value, is_constant


def refresh_meta_downstream(gm: fx.GraphModule, changed: set[fx.Node]) -> None:
    """Re-run each call_function that reads a changed node on the fake values of its inputs,
    so meta["val"] shows the strides the node will really produce. A node whose op cannot run
    on fake values keeps its old value: its shape is still right, and every consumer of strides
    (kernel launchers) checks them at run time rather than trusting them."""
    fake_mode = next((n.meta["val"].fake_mode for n in changed
                      if hasattr(n.meta.get("val"), "fake_mode")), None)
    if fake_mode is None:
        return
    for node in gm.graph.nodes:
        if node in changed or node.op != "call_function":
            continue
        if not any(a in changed for a in node.all_input_nodes):
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs),
                                       lambda a: fake_value(a, fake_mode))
        try:
            with fake_mode:
                node.meta["val"] = node.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - an op with no fake kernel: keep the old value
            continue
        changed.add(node)


def fake_value(node: fx.Node, fake_mode) -> object:
    """A fake tensor for `node`: its meta value, or for a constant one made from its data
    (with static sizes: a symbol without a source would break Dynamo's guards)."""
    if is_constant(node):
        value = constant_value(node)
        return (fake_mode.from_tensor(value, static_shapes=True) if value.layout == torch.strided
                else value)
    return node.meta.get("val")


def set_meta(nodes: list[fx.Node], fake_mode) -> None:
    """Give new nodes (in graph order) their meta value by running each op on fake inputs."""
    for node in nodes:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs),
                                       lambda a: fake_value(a, fake_mode))
        with fake_mode:
            node.meta["val"] = node.target(*args, **kwargs)
