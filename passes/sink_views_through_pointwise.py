"""A reshape and its inverse around elementwise ops dropped, so the ops between two matmuls see
one shape."""

from __future__ import annotations

import torch
import torch.fx as fx

from jitopt.passes.fusible_ops import POINTWISE
from jitopt.passes.graph_facts import is_mutated, is_output, static_shape, tensor_meta
from jitopt.passes.refresh_meta import set_meta

aten = torch.ops.aten
RESHAPES = frozenset({aten.view.default, aten._unsafe_view.default, aten.reshape.default})
# Elementwise ops whose result depends on nothing but their operands' values: not copies
# that pick a layout or dtype (_to_copy, clone), not factories.
ELEMENTWISE = POINTWISE - {aten._to_copy.default, aten.clone.default, aten.alias.default,
                           aten.lift_fresh_copy.default, aten.full.default,
                           aten.scalar_tensor.default, aten.arange.start_step}


def sink_views_through_pointwise(gm: fx.GraphModule) -> int:
    """Rewrites reshape(f(...g(reshape(y, S))...), shape of y) to f(...g(y)...) for a chain of
    elementwise ops f, g (each the only user of the one before), whose other tensor operands
    are 0-d or vectors along a last dim the reshape keeps. Why: a transformer applies its
    activation to the 3-D view of a 2-D matmul output and views the result back to 2-D for
    the next matmul; a fused kernel cannot follow a reshape that splits or merges dimensions,
    so the epilogue, the activation and the next layer's input steps ran as three kernels
    with two round trips through memory. Safe: an elementwise op takes each element to the
    same position whatever the shape, and the two reshapes cancel. Only a reshape that meets
    its inverse moves: one that does not would only carry ops across to the other shape."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in RESHAPES and node.users:
            changed += _cancel(gm, node)
    return changed


def _cancel(gm: fx.GraphModule, view: fx.Node) -> int:
    source = view.args[0]
    inner, outer = static_shape(source), static_shape(view)
    if (inner is None or outer is None or is_mutated(view) or not isinstance(source, fx.Node)
            or not tensor_meta(source).is_contiguous()):
        return 0  # (the inverse view's result is contiguous: so must its replacement be)
    chain, node = [], view
    while len(node.users) == 1 and not is_output(node):
        user = next(iter(node.users))
        if user.target in RESHAPES and static_shape(user) == inner and not is_mutated(user):
            return _rewrite(gm, view, chain, user)
        if not (user.target in ELEMENTWISE and static_shape(user) == outer
                and not is_mutated(user) and _operands_commute(user, node, inner, outer)):
            return 0
        chain.append(user)
        node = user
    return 0


def _operands_commute(op: fx.Node, carried: fx.Node, inner: tuple, outer: tuple) -> bool:
    """Every tensor operand of `op` but the carried value broadcasts over the inner shape as
    over the outer one: a 0-d tensor, or a vector along a last dim both shapes share."""
    for arg in (*op.args, *op.kwargs.values()):
        if not isinstance(arg, fx.Node) or arg is carried:
            continue
        val = tensor_meta(arg)
        if val is None or not (val.dim() == 0 or (
                val.dim() == 1 and inner and inner[-1] == outer[-1]
                and val.shape[0] in (1, outer[-1]))):
            return False
    return True


def _rewrite(gm: fx.GraphModule, view: fx.Node, chain: list[fx.Node], inverse: fx.Node) -> int:
    value, new = view.args[0], []
    carried = view
    for op in chain:
        with gm.graph.inserting_before(inverse):
            args, kwargs = fx.node.map_arg((op.args, op.kwargs),
                                           lambda a, c=carried, v=value: v if a is c else a)
            new.append(gm.graph.call_function(op.target, args, kwargs))
        carried, value = op, new[-1]
    if new:
        set_meta(new, tensor_meta(view).fake_mode)
    inverse.replace_all_uses_with(value)
    for dead in [inverse, *reversed(chain), view]:
        gm.graph.erase_node(dead)
    return 1
