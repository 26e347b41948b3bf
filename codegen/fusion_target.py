"""What the kernel-generating targets (cpp, triton) share: taking the fusion groups of their
device, lowering them together, and the parts of a generated launcher that do not depend on
the kernel language."""

from __future__ import annotations

import dataclasses
import hashlib
import operator
from collections.abc import Callable, Sequence
from typing import Any

import sympy
import torch
import torch.fx as fx

from jitopt.codegen.kernel_ir import Kernel, Size, index_source
from jitopt.passes.group_fusions import GROUP_KEY


class FusionTarget:
    """A target that turns each fusion group on `device` into one generated kernel.
    Subclasses implement lower_all."""

    name: str
    device: str

    def supports(self, node: fx.Node) -> bool:
        """A node of a fusion group whose values all live on this target's device."""
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
        # A group of getitems alone is what an earlier target left behind when it carved a
        # multi-output group (the getitems that unpack its call inherit the group's tag).
        computing = [[n for n in g if n.target is not operator.getitem] for g in groups.values()]
        return [g for g, work in zip(groups.values(), computing)
                if work and all(self.supports(n) for n in work)]

    def lower(self, partition: fx.GraphModule) -> Callable[..., Any]:
        """One group's launcher (raises what lower_all would return for it)."""
        result = self.lower_all({"kernel": partition})["kernel"]
        if isinstance(result, Exception):
            raise result
        return result

    def lower_all(self, partitions: dict[str, fx.GraphModule], *,
                  background: bool = False) -> dict[str, Any]:
        """Each partition's artifact, or the exception that kept it on ATen. `background`:
        the artifacts may finish building after this returns (running ATen until then)."""
        raise NotImplementedError


def plan_kernels(partitions: dict[str, fx.GraphModule], render: Callable[[Kernel], str]
                 ) -> tuple[dict[str, Exception], dict[str, tuple], list[Kernel]]:
    """Lower each group and render its kernel with `render`: (the exception of each group
    that could not be lowered, (kernel, signature, group) by group name, the distinct kernels:
    groups whose rendered bodies are equal share one kernel, named by the body's hash)."""
    from jitopt.codegen.lowering import lower_group

    failed: dict[str, Exception] = {}
    planned: dict[str, tuple] = {}
    by_body: dict[str, Kernel] = {}
    for name, gm in partitions.items():
        try:
            kernel, signature = lower_group(gm, "kernel")
            body = render(kernel)
        except Exception as e:  # lowering declined or failed: this group stays on ATen
            failed[name] = e
            continue
        digest = hashlib.sha256(body.encode()).hexdigest()[:10]
        kernel = by_body.setdefault(digest, dataclasses.replace(
            kernel, name=f"{kernel_name(gm)}_{digest}"))
        planned[name] = (kernel, signature, gm)
    return failed, planned, list(by_body.values())


def kernel_name(gm: fx.GraphModule) -> str:
    """A readable kernel name from the group's ops: fused_mul_add_sigmoid."""
    names: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            op = node.target.overloadpacket.__name__.strip("_")
            if op not in names:
                names.append(op)
    return "fused_" + "_".join(names[:4])


def tensor_params(gm: fx.GraphModule) -> tuple[list[str], list[str]]:
    """(every placeholder's name, the names of the tensor ones the kernel reads)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    tensors = [n.name for n in placeholders if isinstance(n.meta.get("val"), torch.Tensor)]
    return [n.name for n in placeholders], tensors


def returns_single(gm: fx.GraphModule) -> bool:
    """Does the group return one value (fuse_by_partitions then uses it without getitem)?"""
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return not isinstance(output, (tuple, list))


def layout_check(arg: str, shape: Sequence[Size], strides: Sequence[Size]) -> list[str]:
    """Launcher lines: kernels index inputs with the strides they were compiled for, so check
    them, and copy into that layout when they differ. Symbolic strides (a slice of a [1, s, 3C]
    projection: (3C s, 3C, 1)) are expressions over the launcher's size variables, so the
    launcher assigns those first."""
    static = all(isinstance(s, int) for s in strides)
    if not static and _contiguous(shape, strides):
        return [f"    if not {arg}.is_contiguous():", f"        {arg} = {arg}.contiguous()"]
    dims = [d for d, size in enumerate(shape) if size != 1]  # a size-1 dim's stride is free
    if not dims:
        return []
    got = (f"{arg}.stride()" if len(dims) == len(shape) else
           "(" + "".join(f"{arg}.stride({d}), " for d in dims) + ")")
    want = size_tuple([strides[d] for d in dims])
    return [f"    if {got} != {want}:",
            f"        {arg} = relayout({arg}, {size_tuple(strides)})"]


def _contiguous(shape: Sequence[Size], strides: Sequence[Size]) -> bool:
    expected: Size = 1
    for size, stride in reversed(list(zip(shape, strides))):
        if size != 1 and sympy.expand(sympy.sympify(stride) - expected) != 0:
            return False
        expected = expected * size
    return True


def size_tuple(values: Sequence[Size]) -> str:
    """Sizes as a Python tuple expression over the launcher's size variables."""
    parts = [index_source(v) for v in values]
    return f"({parts[0]},)" if len(parts) == 1 else f"({', '.join(parts)})"
