"""The graph invariants of passes/README.md, checked."""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from jitopt.ops import kv_append

# Python-level callables a graph may hold besides ATen overloads: tuple indexing, the SymInt
# arithmetic Dynamo emits for dynamic shapes, and jitopt's own KV-cache append (which no torch
# op can express: its result may share storage with its input).
ALLOWED_FUNCTIONS = frozenset([
    kv_append,
    operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
    operator.truediv, operator.mod, operator.pow, operator.neg, operator.eq, operator.ne,
    operator.lt, operator.le, operator.gt, operator.ge, operator.and_, operator.or_,
    math.ceil, math.floor, math.sqrt, torch.sym_float, torch.sym_int, torch.sym_max,
    torch.sym_min, torch.sym_not, torch.sym_sum,
])


class InvariantError(AssertionError):
    pass


def verify_graph(gm: fx.GraphModule, placeholders: list[str]) -> None:
    """Raise InvariantError naming the node that breaks an invariant."""
    gm.graph.lint()
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    if names != placeholders:
        raise InvariantError(f"placeholders changed: {placeholders} -> {names}")
    for node in gm.graph.nodes:
        _check_node(gm, node)


def _check_node(gm: fx.GraphModule, node: fx.Node) -> None:
    if node.op == "call_function":
        target = node.target
        if not isinstance(target, torch._ops.OpOverload) and target not in ALLOWED_FUNCTIONS:
            raise InvariantError(f"not an ATen overload or allowed function: {node.format_node()}")
        if "val" not in node.meta:
            raise InvariantError(f"node has no meta['val']: {node.format_node()}")
    elif node.op == "get_attr":
        if not isinstance(getattr(gm, node.target, None), torch.Tensor):
            raise InvariantError(f"get_attr names no tensor: {node.format_node()}")
    elif node.op in ("call_module", "call_method"):
        raise InvariantError(f"{node.op} in an ATen graph: {node.format_node()}")
