"""The CPU target: each fusion group becomes a generated C++ kernel, and each attention call,
blocked-weight linear or Winograd convolution one of our hand-written kernels
(cpp_attention.py, cpp_float_linear.py, cpp_quantized_linear.py, cpp_winograd.py); one
library per graph."""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from jitopt.codegen.cpp_attention import (
    ATTENTION_PRELUDE, attention_groups, attention_node, attention_output_layout, attention_spec,
    render_attention, render_attention_launcher)
from jitopt.codegen.cpp_quantized_linear import (
    QUANTIZED_LINEAR_PRELUDE, quantized_linear_groups, quantized_linear_node, quantized_linear_spec,
    render_quantized_linear, render_quantized_linear_launcher)
from jitopt.codegen.cpp_compiler import LibraryBuild
from jitopt.codegen.cpp_float_linear import (
    FLOAT_LINEAR_PRELUDE, float_linear_groups, float_linear_node, float_linear_spec,
    render_float_linear)
from jitopt.codegen.cpp_kernel import render_kernel, render_source
from jitopt.codegen.cpp_winograd import (
    WINOGRAD_PRELUDE, render_winograd, render_winograd_launcher, winograd_groups, winograd_node,
    winograd_output_layout, winograd_pointers, winograd_spec)
from jitopt.codegen.fusion_target import (
    FusionTarget, layout_check, plan_kernels, returns_single, size_tuple, tensor_params)
from jitopt.codegen.kernel_ir import Kernel
from jitopt.codegen.lowering import KernelSignature
from jitopt.debug import counters
from jitopt.runtime.cpp_loader import (
    HUGE_PAGE_MIN_BYTES, DeferredLauncher, build_launcher, load_kernel)


@dataclasses.dataclass
class CppArtifact:
    """A compiled group: the launcher the wrapper calls, and the source it came from."""

    finish: Callable[[Path], Callable[..., Any]]  # built library -> launcher
    kernel_name: str
    library_source: str
    launcher_source: str
    output_layouts: list  # per output (shape, strides, dtype) when static, else None
    launcher: Callable[..., Any] | None = None
    target = "cpp"
    source_suffix = "cpp"

    def __call__(self, *args: Any, **outputs: Any) -> Any:
        return self.launcher(*args, **outputs)

    def defer(self, build: concurrent.futures.Future, fallback: Callable[..., Any]) -> None:
        """Run `fallback` (the group's ATen ops) until `build` has made the library."""
        self.launcher = DeferredLauncher(build, self.finish, fallback,
                                         on_ready=lambda launcher: setattr(self, "launcher",
                                                                           launcher))


@dataclasses.dataclass(frozen=True)
class HandWritten:
    """A family of kernels written by hand instead of generated from the kernel IR: one node
    per partition, one compiled kernel per distinct spec (every layer of a transformer shares
    one), all sharing a prelude."""

    name: str  # kernel name prefix and counter
    groups: Callable[[fx.GraphModule], list[list[fx.Node]]]
    node: Callable[[fx.GraphModule], fx.Node | None]
    spec: Callable[[fx.Node], Any]
    prelude: str
    render: Callable[[Any, str], str]  # (spec, kernel name) -> C++
    launcher: Callable[[str, Any, fx.GraphModule], str]  # (name, spec, partition) -> Python
    pointers: Callable[[Any], int]
    sizes: int  # int64 arguments after the pointers
    output_layout: Callable[[Any], tuple | None]  # (shape, strides, dtype, device) if static
    recycled: int = 0  # buffers the launcher keeps between calls (`recycled0`, ...)


def _quantized_linear_pointers(spec) -> int:
    """x, w, y, the bias if any, and the weight's scales: none, per channel, or per group
    with offsets."""
    return 3 + spec.bias + {"int8": 1, "int4": 2}.get(spec.weight, 0)


HAND_WRITTEN = (
    HandWritten("cpp_attention", attention_groups, attention_node, attention_spec,
                ATTENTION_PRELUDE, render_attention, render_attention_launcher,
                lambda spec: 4 + (spec.mask_strides is not None), 0,
                lambda spec: (*attention_output_layout(spec), torch.float32, "cpu")),
    HandWritten("cpp_quantized_linear", quantized_linear_groups, quantized_linear_node, quantized_linear_spec,
                QUANTIZED_LINEAR_PRELUDE, render_quantized_linear, render_quantized_linear_launcher,
                lambda spec: _quantized_linear_pointers(spec), 1, lambda spec: None),
    HandWritten("cpp_winograd", winograd_groups, winograd_node, winograd_spec,
                WINOGRAD_PRELUDE, render_winograd, render_winograd_launcher, winograd_pointers,
                0, lambda spec: (*winograd_output_layout(spec), torch.float32, "cpu"),
                recycled=3),  # the output and the two scratch buffers
    # (the quantized linears' launcher: the same call, x, w, [bias,] y and M)
    HandWritten("cpp_float_linear", float_linear_groups, float_linear_node, float_linear_spec,
                FLOAT_LINEAR_PRELUDE, render_float_linear, render_quantized_linear_launcher,
                lambda spec: 3 + spec.bias, 1, lambda spec: None),
)


class CppTarget(FusionTarget):
    name = "cpp"
    device = "cpu"

    def propose(self, gm: fx.GraphModule) -> list[list[fx.Node]]:
        return super().propose(gm) + [group for family in HAND_WRITTEN
                                      for group in family.groups(gm)]

    def lower_all(self, partitions: dict[str, fx.GraphModule], *,
                  background: bool = False) -> dict[str, Any]:
        """Lower every group, compile all kernels in one library (identical kernels once).
        A group that cannot be lowered maps to its exception (it then runs on ATen).
        `background`: g++ runs in a thread, the groups run on ATen until it is done."""
        families = {name: family for name, gm in partitions.items() for family in HAND_WRITTEN
                    if family.node(gm) is not None}
        fused = {name: gm for name, gm in partitions.items() if name not in families}
        results, planned, kernels = plan_kernels(fused, render_kernel)
        specs = _hand_written_specs(partitions, families, results)
        # Calls of one family and spec share one kernel.
        kernel_names: dict[tuple[str, Any], str] = {}
        for name, spec in specs.items():
            kernel_names.setdefault((families[name].name, spec),
                                    f"{families[name].name[4:]}_{len(kernel_names)}")
        if not planned and not specs:
            return results
        source = render_source(kernels)
        for family in HAND_WRITTEN:
            mine = [(spec, kernel) for (f, spec), kernel in kernel_names.items()
                    if f == family.name]
            if mine:
                source += family.prelude + "".join(family.render(spec, kernel)
                                                   for spec, kernel in mine)
        artifacts = {name: self._fusion_artifact(kernel, signature, gm, source)
                     for name, (kernel, signature, gm) in planned.items()}
        artifacts.update({name: _hand_written_artifact(
            families[name], kernel_names[families[name].name, spec], spec, partitions[name],
            source) for name, spec in specs.items()})
        build = LibraryBuild(source)
        library = build.cached()
        if library is None and background:
            pending = _background_builds().submit(build.run, background=True)
            for name, artifact in artifacts.items():
                artifact.defer(pending, partitions[name])
        else:
            library = library or build.run()
            for artifact in artifacts.values():
                artifact.launcher = artifact.finish(library)
        return {**results, **artifacts}

    def _fusion_artifact(self, kernel: Kernel, signature: KernelSignature, gm: fx.GraphModule,
                         source: str) -> CppArtifact:
        name = f"launch_{kernel.name}"
        launcher_source = render_launcher(name, kernel, signature, gm)
        pointers = len(kernel.inputs) + len(kernel.outputs)

        def finish(library: Path) -> Callable[..., Any]:
            fn = load_kernel(library, kernel.name, pointers, len(kernel.size_args))
            return build_launcher(launcher_source, name, fn, len(signature.outputs))

        layouts = [(*layout, self.device) if all(isinstance(v, int) for v in
                                                 (*layout[0], *layout[1])) else None
                   for layout in signature.outputs]
        return CppArtifact(finish, kernel.name, source, launcher_source, layouts)


_builds: concurrent.futures.ThreadPoolExecutor | None = None


def _background_builds() -> concurrent.futures.ThreadPoolExecutor:
    """One thread running g++ for graphs compiled in the background (g++ itself is the work;
    more at once would only compete with the graphs running meanwhile on two cores)."""
    global _builds
    if _builds is None:
        _builds = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jitopt-g++")
    return _builds


def finish_background_builds(timeout: float | None = None) -> None:
    """Wait for every background kernel build started so far (see Config.background_compile)."""
    if _builds is not None:
        _builds.submit(lambda: None).result(timeout)


def _hand_written_specs(partitions: dict[str, fx.GraphModule],
                        families: dict[str, HandWritten], failed: dict[str, Exception]
                        ) -> dict[str, Any]:
    """Each hand-written partition's spec; one that cannot have one goes to `failed`."""
    specs = {}
    for name, family in families.items():
        try:
            specs[name] = family.spec(family.node(partitions[name]))
        except Exception as e:
            failed[name] = e
    return specs


def _hand_written_artifact(family: HandWritten, kernel_name: str, spec: Any,
                           gm: fx.GraphModule, source: str) -> CppArtifact:
    name = f"launch_{kernel_name}"
    launcher_source = family.launcher(name, spec, gm)

    def finish(library: Path) -> Callable[..., Any]:
        fn = load_kernel(library, kernel_name, family.pointers(spec), family.sizes)
        return build_launcher(launcher_source, name, fn, family.recycled)

    counters["kernels"][family.name] += 1
    return CppArtifact(finish, kernel_name, source, launcher_source, [family.output_layout(spec)])


def render_launcher(name: str, kernel: Kernel, signature: KernelSignature,
                    gm: fx.GraphModule) -> str:
    """Python that checks the kernel's layout assumptions, allocates outputs and calls it."""
    params, tensor_args = tensor_params(gm)
    outs = [f"out{k}" for k in range(len(signature.outputs))]
    params += [f"{o}=None" for o in outs]
    lines = [f"def {name}({', '.join(params)}):"]
    for symbol, i, dim in signature.size_sources:  # (symbolic strides are checked in these)
        lines.append(f"    {symbol.name} = {tensor_args[i]}.shape[{dim}]")
    for arg, (shape, strides, _) in zip(tensor_args, signature.inputs):
        lines += layout_check(arg, shape, strides)
    for k, (shape, strides, dtype) in enumerate(signature.outputs):
        # out{k} given: the memory plan hands over a dead buffer of exactly this layout.
        alloc = f"empty_strided({size_tuple(shape)}, {size_tuple(strides)}, dtype={dtype})"
        if _may_be_huge(shape, dtype):  # large: reuse the last call's buffer when it is free
            alloc = f"recycled{k}({size_tuple(shape)}, {size_tuple(strides)}, {dtype})"
        if all(isinstance(v, int) for v in (*shape, *strides)):
            # A handed-over buffer must have the layout the kernel writes (checked, not trusted).
            lines += [f"    if out{k} is not None and (out{k}.shape != {size_tuple(shape)} or "
                      f"out{k}.stride() != {size_tuple(strides)}):", f"        out{k} = None"]
        lines += [f"    if out{k} is None:", f"        out{k} = {alloc}"]
    pointers = [f"{a}.data_ptr()" for a in tensor_args] + [f"{o}.data_ptr()" for o in outs]
    sizes = [s.name for s in kernel.size_args]
    lines.append(f"    kernel({', '.join(pointers + sizes)})")
    lines.append(f"    return {outs[0]}" if returns_single(gm) else
                 f"    return ({', '.join(outs)},)")
    return "\n".join(lines) + "\n"


def _may_be_huge(shape, dtype: torch.dtype) -> bool:
    """Could this output reach HUGE_PAGE_MIN_BYTES (symbolic sizes: maybe)?"""
    if not all(isinstance(s, int) for s in shape):
        return True
    numel = 1
    for s in shape:
        numel *= s
    return numel * dtype.itemsize >= HUGE_PAGE_MIN_BYTES
