"""Drop ops that return their input unchanged in inference."""

import torch
import torch.fx as fx

from jitopt.passes.graph_facts import is_mutated, is_output, static_shape, tensor_meta

aten = torch.ops.aten


def remove_noops(gm: fx.GraphModule) -> int:
    """Replaces dropout-off, identity copies, same-shape views and x*1 / x+0 with their input;
    safe because each rule checks value, dtype and shape, and skips nodes that are written
    into or returned (where a fresh tensor versus an alias of the input is observable)."""
    removed = 0
    for node in list(gm.graph.nodes):
        rule = _RULES.get(node.target) if node.op == "call_function" else None
        source = rule(node) if rule else None
        if source is None or is_output(node) or is_mutated(node) or is_mutated(source):
            continue
        if not _same_value_type(node, source):
            continue
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        removed += 1
    return removed


def _same_value_type(node: fx.Node, source: fx.Node) -> bool:
    out, src = tensor_meta(node), tensor_meta(source)
    if out is None or src is None or out.dtype != src.dtype or out.device != src.device:
        return False
    shape = static_shape(node)
    if shape is None or shape != static_shape(source):
        return False
    # Strides too: a later view may rely on the fresh (contiguous) layout of a copy.
    return _static_strides(out) is not None and _static_strides(out) == _static_strides(src)


def _static_strides(val: torch.Tensor) -> tuple[int, ...] | None:
    strides = tuple(val.stride())
    return strides if all(isinstance(s, int) for s in strides) else None


def _first_arg(node: fx.Node) -> fx.Node | None:
    return node.args[0] if isinstance(node.args[0], fx.Node) else None


def _dropout(node: fx.Node):
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return _first_arg(node) if (train is False or p == 0) else None


def _clone(node: fx.Node):
    fmt = node.kwargs.get("memory_format")
    return _first_arg(node) if fmt in (None, torch.preserve_format) else None


def _to_copy(node: fx.Node):
    # Same dtype and device are checked by the caller; a layout or format change is not a no-op.
    if set(node.kwargs) - {"dtype", "device", "layout"} or node.kwargs.get("layout") not in (
            None, torch.strided):
        return None
    return _first_arg(node)


def _full_slice(node: fx.Node):
    args = list(node.args) + [None] * (5 - len(node.args))
    _, dim, start, end, step = args
    shape = static_shape(node.args[0])
    if shape is None or start not in (None, 0) or step not in (None, 1):
        return None
    return node.args[0] if end is None or end >= shape[dim or 0] else None


def _scalar_identity(identity):
    def rule(node: fx.Node):
        other = node.args[1] if len(node.args) > 1 else None
        alpha = node.kwargs.get("alpha", 1)
        if type(other) in (int, float) and other == identity and alpha == 1:
            return _first_arg(node)
        return None
    return rule


_RULES = {
    aten.dropout.default: _dropout,
    aten.clone.default: _clone,
    aten.alias.default: _first_arg,
    aten.detach.default: _first_arg,
    aten._to_copy.default: _to_copy,
    aten.view.default: _first_arg,
    aten._unsafe_view.default: _first_arg,
    aten.reshape.default: _first_arg,
    aten.expand.default: _first_arg,
    aten.slice.Tensor: _full_slice,
    aten.mul.Tensor: _scalar_identity(1),
    aten.mul.Scalar: _scalar_identity(1),
    aten.div.Tensor: _scalar_identity(1),
    aten.div.Scalar: _scalar_identity(1),
    # x + 0 turns -0.0 into +0.0; the two compare equal, and every compiler makes this trade.
    aten.add.Tensor: _scalar_identity(0),
    aten.add.Scalar: _scalar_identity(0),
    aten.sub.Tensor: _scalar_identity(0),
    aten.sub.Scalar: _scalar_identity(0),
}
