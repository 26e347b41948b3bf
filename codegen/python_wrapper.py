"""Render a partitioned ATen graph as a readable Python function: the runtime's entry point.

Our own emitter rather than GraphModule.code: the wrapper calls ops through their C++ entry
points, frees each value after its last use, and carries no fx machinery at run time, so the
runtime can load it (and later a cached copy) without importing the compiler."""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import torch
import torch.fx as fx

from jitopt.codegen.memory_plan import plan_output_reuse

_INFIX = {operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/",
          operator.floordiv: "//", operator.mod: "%", operator.pow: "**", operator.eq: "==",
          operator.ne: "!=", operator.lt: "<", operator.le: "<=", operator.gt: ">",
          operator.ge: ">="}


@dataclasses.dataclass
class WrapperSource:
    source: str
    bindings: dict[str, Any]  # constants, artifacts and non-literal arguments, by global name
    # The same function with each compiled partition's call inside a torch.profiler
    # record_function named after its kernel, for the runtime to run while a profiler records.
    profiled_source: str = ""


def render_wrapper(gm: fx.GraphModule, artifacts: dict[str, Any], title: str) -> WrapperSource:
    return _Renderer(gm, artifacts).render(title)


class _Renderer:
    def __init__(self, gm: fx.GraphModule, artifacts: dict[str, Any]) -> None:
        self.gm = gm
        self.artifacts = artifacts
        self.bindings: dict[str, Any] = {}
        self.header: dict[str, str] = {}  # global name -> the line that defines it
        self.names: dict[fx.Node, str] = {}
        self.taken = {n.name for n in gm.graph.nodes} | {"args", "torch"}
        self.reuse = plan_output_reuse(gm, artifacts)
        donors = {d for outs in self.reuse.values() for d in outs.values()}
        self.donors = donors

    def render(self, title: str) -> WrapperSource:
        nodes = list(self.gm.graph.nodes)
        last_use = {}
        for i, node in enumerate(nodes):
            for arg in node.all_input_nodes:
                last_use[arg] = i
        placeholders = [n for n in nodes if n.op == "placeholder"]
        for n in placeholders:
            self.names[n] = n.name
        body = [f"    {_unpack(placeholders)} = args", "    args.clear()"]
        profiled = list(body)
        for i, node in enumerate(nodes):
            line = self._line(node)
            if line:
                body.append("    " + line)
                profiled += self._profiled(node, line)
            # A donor stays alive until the kernel that writes into its buffer has run.
            dead = [self.names[a] for a in node.all_input_nodes
                    if last_use[a] == i and a.op != "get_attr" and node.op != "output"
                    and a not in self.donors]
            dead += [self.names[d] for d in self.reuse.get(node, {}).values()]
            dead += [n.name for n in placeholders if n not in last_use and i == 0]
            if dead:
                body.append(f"    del {', '.join(sorted(set(dead)))}")
                profiled.append(body[-1])
        ops = sum(1 for n in nodes if n.op == "call_function")
        head = [f"# {title}: {ops} ops, {len(self.artifacts)} compiled partitions",
                *self.header.values(), "", ""]
        return WrapperSource("\n".join([*head, "def run(args):", *body, ""]), self.bindings,
                             "\n".join([*head, "def run(args):", *profiled, ""]))

    def _profiled(self, node: fx.Node, line: str) -> list[str]:
        """`line` inside a record_function named "jitopt <partition>: <kernel>" when it
        calls a compiled partition."""
        if node.op != "call_module":
            return ["    " + line]
        kernel = getattr(self.artifacts[node.target], "kernel_name", "")
        label = f"jitopt {node.target}: {kernel}" if kernel else f"jitopt {node.target}"
        return [f"    with torch.profiler.record_function({label!r}):", "        " + line]

    def _line(self, node: fx.Node) -> str | None:
        if node.op == "placeholder":
            return None
        if node.op == "get_attr":
            # A constant is a global under its node's name (unique in the graph).
            self.names[node] = node.name
            self.bindings[node.name] = getattr(self.gm, node.target)
            return None
        if node.op == "output":
            return f"return {self._value(node.args[0])}"
        self.names[node] = node.name
        if not node.users:  # a mutation kept for its effect (copy_ into an input)
            return self._call(node)
        return f"{node.name} = {self._call(node)}"

    def _call(self, node: fx.Node) -> str:
        args = [self._value(a) for a in node.args]
        args += [f"{k}={self._value(v)}" for k, v in node.kwargs.items()]
        target = node.target
        if node.op == "call_module":
            artifact = self.artifacts[node.target]
            # Call the launcher itself: one Python frame less per kernel call.
            fn = self._bind(node.target, getattr(artifact, "launcher", artifact))
            args += [f"out{k}={self.names[d]}" for k, d in sorted(self.reuse.get(node, {}).items())]
            return f"{fn}({', '.join(args)})"
        if target is operator.getitem:
            return f"{args[0]}[{args[1]}]"
        if target in _INFIX and len(args) == 2:
            return f"{args[0]} {_INFIX[target]} {args[1]}"
        return f"{self._function(target)}({', '.join(args)})"

    def _function(self, target: Any) -> str:
        if isinstance(target, torch._ops.OpOverload):
            packet = target.overloadpacket.__name__
            name = f"{packet}_{target._overloadname}".replace(".", "_")
            qualname = f"{target.namespace}::{packet}.{target._overloadname}"
            return self._header(name, f'aten_op("{qualname}")')
        path = f"{target.__module__}.{target.__name__}"
        return self._header(path.replace(".", "_"), f'python_function("{path}")')

    def _header(self, name: str, definition: str) -> str:
        """A global bound once at load time; named apart from every value in the graph."""
        line = f"{{}} = {definition}"
        for existing, text in self.header.items():
            if text == line.format(existing):
                return existing
        name = self._fresh(name)
        self.header[name] = line.format(name)
        return name

    def _bind(self, name: str, value: Any) -> str:
        for existing, bound in self.bindings.items():
            if bound is value:
                return existing
        name = self._fresh("".join(c if c.isalnum() else "_" for c in name))
        self.bindings[name] = value
        return name

    def _fresh(self, name: str) -> str:
        while name in self.taken:
            name += "_"
        self.taken.add(name)
        return name

    def _value(self, value: Any) -> str:
        if isinstance(value, fx.Node):
            return self.names[value]
        if isinstance(value, (list, tuple)):
            inner = ", ".join(self._value(v) for v in value)
            if isinstance(value, tuple):
                return f"({inner},)" if len(value) == 1 else f"({inner})"
            return f"[{inner}]"
        literal = _literal(value)
        if literal is not None:
            return literal
        return self._bind(f"k{len(self.bindings)}", value)


def _literal(value: Any) -> str | None:
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else f"float('{value}')"
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
        return str(value)  # "torch.float32", "torch.strided", "torch.contiguous_format"
    if isinstance(value, torch.device):
        return f"torch.device({str(value)!r})"
    return None


def _unpack(placeholders: list[fx.Node]) -> str:
    if not placeholders:
        return "()"
    names = ", ".join(n.name for n in placeholders)
    return f"({names},)" if len(placeholders) == 1 else names
