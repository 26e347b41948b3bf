"""Memory plan: a kernel writes its output into the buffer of an intermediate that just died.

Within one call of a graph, a dead intermediate with exactly the layout a kernel output needs
(shape, strides, dtype; static shapes only) is handed to the kernel instead of allocating:
fewer allocator calls, and for large tensors no fresh pages to fault in. A buffer is only
reused when nothing can still see it: it is not a graph output, no view or alias of it was
taken, and it came from an op that returns fresh memory (one of our kernels, or an ATen op
whose schema returns no alias). Buffers are not kept across calls: the caller owns outputs,
and a compiled graph may run on several threads at once.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

Layout = tuple[tuple[int, ...], tuple[int, ...], torch.dtype, str]  # ..., device type

# Views whose schema carries no alias annotation (AOTAutograd emits _unsafe_view after every
# batched matmul): by schema they look like fresh tensors, but they share their input's memory.
_UNANNOTATED_VIEWS = frozenset({torch.ops.aten._unsafe_view.default})


def plan_output_reuse(gm: fx.GraphModule, artifacts: dict[str, Any]
                      ) -> dict[fx.Node, dict[int, fx.Node]]:
    """For each kernel call: output number -> the dead value whose buffer it writes into."""
    nodes = list(gm.graph.nodes)
    last_use: dict[fx.Node, int] = {}
    for i, node in enumerate(nodes):
        for arg in node.all_input_nodes:
            last_use[arg] = i
    pool: dict[Layout, list[fx.Node]] = {}
    plan: dict[fx.Node, dict[int, fx.Node]] = {}
    for i, node in enumerate(nodes):
        wanted = _kernel_outputs(node, artifacts)
        for k, layout in enumerate(wanted):
            if layout is not None and pool.get(layout):
                plan.setdefault(node, {})[k] = pool[layout].pop()
        for arg in node.all_input_nodes:
            if last_use[arg] == i:
                layout = _donor_layout(arg, artifacts)
                if layout is not None:
                    pool.setdefault(layout, []).append(arg)
    return plan


def _kernel_outputs(node: fx.Node, artifacts: dict[str, Any]) -> list[Layout | None]:
    """The layouts of a generated kernel's outputs (our kernels declare them; any other
    partition's outputs are unknown and never take part)."""
    if node.op != "call_module":
        return []
    return list(getattr(artifacts.get(node.target), "output_layouts", None) or [])


def _donor_layout(node: fx.Node, artifacts: dict[str, Any]) -> Layout | None:
    """The layout of `node`'s buffer when it may be reused after its last use, else None."""
    if any(user.op == "output" or _aliases(user, artifacts) for user in node.users):
        return None
    if node.op == "call_module":
        layouts = _kernel_outputs(node, artifacts)
        single = not any(u.target is operator.getitem for u in node.users)
        return layouts[0] if single and layouts else None
    if node.op == "call_function" and node.target is operator.getitem:
        producer = node.args[0]
        if isinstance(producer, fx.Node) and producer.op == "call_module":
            layouts = _kernel_outputs(producer, artifacts)
            return layouts[node.args[1]] if node.args[1] < len(layouts) else None
        return None
    if node.op == "call_function" and _returns_fresh_tensor(node):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and _static(val):
            return tuple(val.shape), tuple(val.stride()), val.dtype, val.device.type
    return None


def _returns_fresh_tensor(node: fx.Node) -> bool:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable:
        return False
    if target in _UNANNOTATED_VIEWS:
        return False
    returns = target._schema.returns
    return len(returns) == 1 and returns[0].alias_info is None


def _aliases(user: fx.Node, artifacts: dict[str, Any]) -> bool:
    """Could `user`'s result share memory with its inputs (a view, or an op we cannot see
    into)?"""
    target = user.target
    if user.op == "call_module":  # our kernels never return their inputs; others may
        return user.target not in artifacts or not hasattr(artifacts[user.target],
                                                           "output_layouts")
    if user.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return user.op != "output"
    return (target in _UNANNOTATED_VIEWS or target._schema.is_mutable
            or any(r.alias_info is not None for r in target._schema.returns))


def _static(val: torch.Tensor) -> bool:
    return all(isinstance(s, int) for s in (*val.shape, *val.stride()))
