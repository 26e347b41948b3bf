"""Frozen constants in a graph: `get_attr` nodes naming tensors stored on the GraphModule."""

from __future__ import annotations

import torch
import torch.fx as fx


def is_constant(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def constant_value(node: fx.Node) -> torch.Tensor:
    return getattr(node.graph.owning_module, node.target)


def add_constant(gm: fx.GraphModule, value: torch.Tensor, hint: str,
                 before: fx.Node) -> fx.Node:
    """Store `value` on `gm` under a fresh name and return a get_attr node placed before `before`."""
    base = "folded_" + "".join(c if c.isalnum() else "_" for c in hint)
    name, k = base, 0
    while hasattr(gm, name):
        k += 1
        name = f"{base}_{k}"
    # A non-persistent buffer: fx accepts get_attr of it, and state_dict() stays clean.
    gm.register_buffer(name, value, persistent=False)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = meta_like(value)
    return node


def meta_like(value: torch.Tensor) -> torch.Tensor:
    """A storage-free stand-in with the same shape, strides and dtype, for node.meta['val']
    (contiguous for a library's opaque layout, such as a oneDNN-packed weight)."""
    if value.layout != torch.strided:
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")


def delete_unused_constants(gm: fx.GraphModule) -> int:
    """Drop tensor attributes no get_attr node names any more, so their memory is freed."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    stale = [name for name in gm._buffers if name not in used]
    for name in stale:
        del gm._buffers[name]
    return len(stale)
