"""Questions passes ask about nodes: is it pure, is it mutated, is it a graph output."""

from __future__ import annotations

import torch
import torch.fx as fx


def is_op(node: object, *targets: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def is_pure_op(node: fx.Node) -> bool:
    """A deterministic, non-mutating ATen op: safe to dedupe, fold, or drop when unused."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return True


def writes_input(node: fx.Node) -> bool:
    """True when `node` is an op that writes into one of its arguments (copy_, add_, ...)."""
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable


def is_mutated(node: fx.Node) -> bool:
    """True when some user writes into `node`'s value."""
    for user in node.users:
        if not writes_input(user):
            continue
        schema_args = user.target._schema.arguments
        for i, arg in enumerate(user.args):
            if arg is node and i < len(schema_args):
                info = schema_args[i].alias_info
                if info is not None and info.is_write:
                    return True
        for name, arg in user.kwargs.items():
            if arg is node:
                return True
    return False


def has_symbolic_args(node: fx.Node) -> bool:
    """Does an argument hold a symbolic size or scalar (a value only known at run time)?"""
    found: list[object] = []
    fx.node.map_aggregate((node.args, node.kwargs), lambda a: found.append(a) if isinstance(
        a, torch.SymInt | torch.SymFloat | torch.SymBool) else a)
    return bool(found)


def is_output(node: fx.Node) -> bool:
    return any(user.op == "output" for user in node.users)


def only_user(node: fx.Node) -> fx.Node | None:
    """The one node reading `node`'s value, when exactly one does and it is not returned."""
    if is_output(node) or len(node.users) != 1:
        return None
    return next(iter(node.users))


def static_shape(node: object) -> tuple[int, ...] | None:
    """The node's shape when every dimension is a plain int, else None."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    shape = tuple(val.shape)
    return shape if all(isinstance(d, int) for d in shape) else None


def tensor_meta(node: object) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None
