"""The CPU target: each fusion group becomes a generated C++ kernel, one library per graph."""

from __future__ import annotations

import dataclasses
import hashlib
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from jitopt.codegen.cpp_compiler import compile_library
from jitopt.codegen.cpp_kernel import render_kernel, render_source
from jitopt.codegen.kernel_ir import Kernel, index_source
from jitopt.codegen.lowering import KernelSignature, lower_group
from jitopt.passes.group_fusions import GROUP_KEY
from jitopt.runtime.cpp_loader import build_launcher, load_kernel


@dataclasses.dataclass
class CppArtifact:
    """A compiled group: the launcher the wrapper calls, and the source it came from."""

    launcher: Callable[..., Any]
    kernel_name: str
    library_source: str
    launcher_source: str
    output_layouts: list  # per output (shape, strides, dtype) when static, else None
    target = "cpp"
    source_suffix = "cpp"

    def __call__(self, *args: Any, **outputs: Any) -> Any:
        return self.launcher(*args, **outputs)


class CppTarget:
    name = "cpp"
    device = "cpu"

    def supports(self, node: fx.Node) -> bool:
        val = node.meta.get("val")
        vals = val if isinstance(val, (tuple, list)) else [val]
        return GROUP_KEY in node.meta and all(
            isinstance(v, torch.Tensor) and v.device.type == self.device for v in vals)

    def propose(self, gm: fx.GraphModule) -> list[list[fx.Node]]:
        """The fusion groups group_fusions marked, on this target's device."""
        groups: dict[int, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if node.op == "call_function" and GROUP_KEY in node.meta:
                groups.setdefault(node.meta[GROUP_KEY], []).append(node)
        return [g for g in groups.values() if all(self.supports(n) for n in g
                                                  if n.target is not operator.getitem)]

    def lower(self, partition: fx.GraphModule) -> Callable[..., Any]:
        result = self.lower_all({"kernel": partition})["kernel"]
        if isinstance(result, Exception):
            raise result
        return result

    def lower_all(self, partitions: dict[str, fx.GraphModule]) -> dict[str, Any]:
        """Lower every group, compile all kernels in one library (identical kernels once).
        A group that cannot be lowered maps to its exception (it then runs on ATen)."""
        results: dict[str, Any] = {}
        kernels: dict[str, Kernel] = {}  # body hash -> kernel
        planned: dict[str, tuple[Kernel, KernelSignature, fx.GraphModule]] = {}
        for name, gm in partitions.items():
            try:
                kernel, signature = lower_group(gm, "kernel")
                body = render_kernel(kernel)
            except Exception as e:  # lowering declined or failed: this group stays on ATen
                results[name] = e
                continue
            digest = hashlib.sha256(body.encode()).hexdigest()[:10]
            kernel = kernels.setdefault(digest, dataclasses.replace(
                kernel, name=f"{_describe(gm)}_{digest}"))
            planned[name] = (kernel, signature, gm)
        if not planned:
            return results
        source = render_source(list(kernels.values()))
        library = compile_library(source)
        for name, (kernel, signature, gm) in planned.items():
            fn = load_kernel(library, kernel.name, len(kernel.inputs) + len(kernel.outputs),
                             len(kernel.size_args))
            launcher_source = render_launcher(f"launch_{kernel.name}", kernel, signature, gm)
            launcher = build_launcher(launcher_source, f"launch_{kernel.name}", fn)
            layouts = [layout if all(isinstance(v, int) for v in (*layout[0], *layout[1]))
                       else None for layout in signature.outputs]
            results[name] = CppArtifact(launcher, kernel.name, source, launcher_source, layouts)
        return results


def _describe(gm: fx.GraphModule) -> str:
    """A readable kernel name from the group's ops: fused_mul_add_sigmoid."""
    names: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            op = node.target.overloadpacket.__name__.strip("_")
            if op not in names:
                names.append(op)
    return "fused_" + "_".join(names[:4])


def render_launcher(name: str, kernel: Kernel, signature: KernelSignature,
                    gm: fx.GraphModule) -> str:
    """Python that checks the kernel's layout assumptions, allocates outputs and calls it."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    tensor_args = [n.name for n in placeholders if isinstance(n.meta.get("val"), torch.Tensor)]
    outs = [f"out{k}" for k in range(len(signature.outputs))]
    params = [n.name for n in placeholders] + [f"{o}=None" for o in outs]
    lines = [f"def {name}({', '.join(params)}):"]
    for arg, (shape, strides, _) in zip(tensor_args, signature.inputs):
        lines += _layout_check(arg, shape, strides)
    for symbol, i, dim in signature.size_sources:
        lines.append(f"    {symbol.name} = {tensor_args[i]}.shape[{dim}]")
    for k, (shape, strides, dtype) in enumerate(signature.outputs):
        # out{k} given: the memory plan hands over a dead buffer of exactly this layout.
        lines += [f"    if out{k} is None:",
                  f"        out{k} = empty_strided({_tuple(shape)}, {_tuple(strides)}, "
                  f"dtype={dtype})"]
    pointers = [f"{a}.data_ptr()" for a in tensor_args] + [f"{o}.data_ptr()" for o in outs]
    sizes = [s.name for s in kernel.size_args]
    lines.append(f"    kernel({', '.join(pointers + sizes)})")
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    single = not isinstance(output, (tuple, list))
    lines.append(f"    return {outs[0]}" if single else f"    return ({', '.join(outs)},)")
    return "\n".join(lines) + "\n"


def _layout_check(arg: str, shape, strides) -> list[str]:
    """Kernels index inputs with the strides they were compiled for: check, copy if not."""
    if all(isinstance(s, int) for s in strides):
        # A size-1 dim is never stepped along, so its stride is free.
        dims = [d for d, size in enumerate(shape) if size != 1]
        if not dims:
            return []
        got = f"{arg}.stride()" if len(dims) == len(shape) else \
            "(" + ", ".join(f"{arg}.stride({d})" for d in dims) + ("," if len(dims) == 1 else "") + ")"
        want = _tuple([strides[d] for d in dims])
        return [f"    if {got} != {want}:", f"        {arg} = relayout({arg}, {_tuple(strides)})"]
    if _contiguous(shape, strides):
        return [f"    if not {arg}.is_contiguous():", f"        {arg} = {arg}.contiguous()"]
    raise NotImplementedError("a non-contiguous input with symbolic strides")


def _contiguous(shape, strides) -> bool:
    expected = 1
    for size, stride in reversed(list(zip(shape, strides))):
        if size != 1 and stride != expected:
            return False
        expected = expected * size
    return True


def _tuple(values) -> str:
    parts = [index_source(v) for v in values]
    return f"({parts[0]},)" if len(parts) == 1 else f"({', '.join(parts)})"
