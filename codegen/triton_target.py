"""The GPU target: each fusion group becomes a generated Triton kernel, one module per graph.

The same fusion groups and kernel IR as the C++ target (codegen/cpp_target.py), rendered by
codegen/triton_kernel.py. Per group, a generated Python launcher checks the input layouts the
kernel was compiled for, allocates the outputs on the inputs' device and launches the kernel
over a grid computed from the sizes; triton.autotune picks the block sizes per distinct size.

Triton is imported only when a graph is lowered, so jitopt imports without it; the target
then declines every group with the reason, and they run on ATen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.fx as fx

from jitopt.codegen import lowering, triton_kernel
from jitopt.codegen.fusion_target import (
    FusionTarget, layout_check, plan_kernels, returns_single, size_tuple, tensor_params)
from jitopt.codegen.kernel_ir import Kernel, index_source
from jitopt.codegen.triton_quantized_linear import (
    render_triton_linear, render_triton_linear_launcher, tiles, triton_linear_groups,
    triton_linear_node, triton_linear_spec)
from jitopt.debug import counters
from jitopt.errors import Declined, JitoptFallbackWarning
from jitopt.runtime.cpp_loader import relayout
from jitopt.runtime.kernel_cache import default_cache_dir

# The tuning space: a few shapes of work per program. Pointwise programs take XBLOCK points;
# reduction programs take XBLOCK rows, RBLOCK of each row at a time (XBLOCK 1: a long row per
# program; larger XBLOCK: many short rows).
POINTWISE_CONFIGS = ({"XBLOCK": 256, "num_warps": 4}, {"XBLOCK": 1024, "num_warps": 4},
                     {"XBLOCK": 1024, "num_warps": 8})
REDUCTION_CONFIGS = ({"XBLOCK": 1, "RBLOCK": 1024, "num_warps": 4},
                     {"XBLOCK": 1, "RBLOCK": 2048, "num_warps": 8},
                     {"XBLOCK": 8, "RBLOCK": 128, "num_warps": 4},
                     {"XBLOCK": 64, "RBLOCK": 16, "num_warps": 4})
# The interpreter cannot time configurations (it has no GPU driver, and runs every program in
# Python): it gets one config, by default with blocks big enough to keep programs few.
INTERPRETER_CONFIGS = {False: ({"XBLOCK": 1024},), True: ({"XBLOCK": 16, "RBLOCK": 64},)}


def triton_unavailable() -> str | None:
    """Why Triton kernels cannot be built here, or None when they can."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    return None


def interpreting() -> bool:
    """Is Triton set to interpret kernels on the CPU (TRITON_INTERPRET=1)? Read at every lower
    because @triton.jit reads it when the generated module is imported."""
    import triton

    knobs = getattr(triton, "knobs", None)  # Triton < 3.3 reads the environment directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@dataclasses.dataclass
class TritonArtifact:
    """A compiled group: the launcher the wrapper calls, and the source it came from."""

    launcher: Callable[..., Any]
    kernel_name: str
    library_source: str
    launcher_source: str
    target = "triton"
    source_suffix = "py"

    def __call__(self, *args: Any) -> Any:
        return self.launcher(*args)


class TritonTarget(FusionTarget):
    """Fusion groups on `device` tensors as Triton kernels. `device` is "cuda" for the
    registered target; tests build one for "cpu" to run kernels in Triton's interpreter.
    `configs` fixes the tuning space (dicts of XBLOCK, RBLOCK, num_warps)."""

    def __init__(self, name: str = "triton", device: str = "cuda",
                 configs: Sequence[dict[str, int]] | None = None) -> None:
        self.name = name
        self.device = device
        self.configs = tuple(configs) if configs is not None else None

    def propose(self, gm: fx.GraphModule) -> list[list[fx.Node]]:
        return super().propose(gm) + triton_linear_groups(gm, self.device)

    def lower_all(self, partitions: dict[str, fx.GraphModule], *,
                  background: bool = False) -> dict[str, Any]:
        """Lower every group into one module of kernels (identical kernels once). A group that
        cannot be lowered maps to its exception (it then runs on ATen). Triton builds each
        kernel at its first launch, so `background` changes nothing here."""
        reason = triton_unavailable()
        if reason is not None:
            return {name: Declined(reason) for name in partitions}
        linears = {name: gm for name, gm in partitions.items()
                   if triton_linear_node(gm) is not None}
        fused = {name: gm for name, gm in partitions.items() if name not in linears}
        results, planned, kernels = plan_kernels(fused, triton_kernel.render_kernel)
        specs = _linear_specs(linears, results)
        if not planned and not specs:
            return results
        interpret = interpreting()
        decorators = {k.name: _autotune(k, self._configs(k, interpret)) for k in kernels}
        # Linears of one spec share one kernel (every layer of a transformer block type).
        linear_kernels = {spec: f"quantized_linear_{i}"
                          for i, spec in enumerate(dict.fromkeys(specs.values()))}
        source = render_source(kernels, decorators) + "".join(
            "\n\n" + render_triton_linear(spec, kernel, tiles(spec, interpret))
            for spec, kernel in linear_kernels.items())
        module = load_module(source)
        for name, (kernel, signature, gm) in planned.items():
            try:
                results[name] = _artifact(kernel, signature, gm, module, source)
            except Exception as e:  # e.g. a layout the launcher cannot check: ATen runs it
                results[name] = e
        for name, spec in specs.items():
            results[name] = _linear_artifact(spec, linear_kernels[spec], linears[name],
                                             module, source)
        return results

    def _configs(self, kernel: Kernel, interpret: bool) -> tuple[dict[str, int], ...]:
        reduction = kernel.reduction_range is not None
        if self.configs is not None:
            configs = _for_kind(self.configs, reduction)
            return configs[:1] if interpret else configs
        if interpret:
            return INTERPRETER_CONFIGS[reduction]
        return _fit_configs(kernel) if reduction else POINTWISE_CONFIGS


def _artifact(kernel: Kernel, signature: lowering.KernelSignature, gm: fx.GraphModule,
              module: ModuleType, source: str) -> TritonArtifact:
    """A group's launcher around its kernel from the loaded module."""
    device = group_device(gm)
    name = f"launch_{kernel.name}"
    launcher_source = render_launcher(name, kernel, signature, gm, device.type)
    launcher = build_launcher(launcher_source, name, getattr(module, kernel.name), device)
    if device.type == "cuda":
        launcher = FirstLaunchFallback(launcher, gm, kernel.name)
    return TritonArtifact(launcher, kernel.name, source, launcher_source)


def _linear_specs(linears: dict[str, fx.GraphModule], failed: dict[str, Any]
                  ) -> dict[str, Any]:
    """Each quantized-linear partition's spec; one that cannot have one goes to `failed`."""
    specs = {}
    for name, gm in linears.items():
        try:
            specs[name] = triton_linear_spec(triton_linear_node(gm))
        except Declined as e:
            failed[name] = e
    return specs


def _linear_artifact(spec: Any, kernel_name: str, gm: fx.GraphModule, module: ModuleType,
                     source: str) -> TritonArtifact:
    """A quantized linear's launcher around its kernel (codegen/triton_quantized_linear.py)."""
    device = group_device(gm)
    name = f"launch_{kernel_name}"
    launcher_source = render_triton_linear_launcher(name, spec, gm, device.type)
    launcher = build_launcher(launcher_source, name, getattr(module, kernel_name), device)
    if device.type == "cuda":
        launcher = FirstLaunchFallback(launcher, gm, kernel_name)
    counters["kernels"]["triton_quantized_linear"] += 1
    return TritonArtifact(launcher, kernel_name, source, launcher_source)


class FirstLaunchFallback:
    """Triton compiles a kernel at its first launch, after lowering is over. If that launch
    fails, the group runs on ATen from then on, with one warning, as a failed lowering would;
    a failure after a successful launch is the program's own and propagates."""

    def __init__(self, launcher: Callable[..., Any], group: fx.GraphModule, name: str) -> None:
        self.launcher, self.group, self.name = launcher, group, name
        self.launched = False

    def __call__(self, *args: Any) -> Any:
        if self.launched:
            return self.launcher(*args)
        try:
            result = self.launcher(*args)
        except Exception as e:
            warnings.warn(f"jitopt: Triton kernel {self.name} failed at its first launch, "
                          f"running its group on ATen instead: {type(e).__name__}: {e}",
                          JitoptFallbackWarning, stacklevel=2)
            counters["fallbacks"]["partition"] += 1
            self.launcher = self.group
            result = self.group(*args)
        self.launched = True
        return result


def _for_kind(configs: Sequence[dict[str, int]], reduction: bool) -> tuple[dict[str, int], ...]:
    """Fixed configs made to fit a kernel: pointwise kernels take no RBLOCK, reductions need
    one."""
    fitted: dict[tuple, None] = {}
    for c in configs:
        c = {**c, "RBLOCK": c.get("RBLOCK", 64)} if reduction else {
            k: v for k, v in c.items() if k != "RBLOCK"}
        fitted[tuple(c.items())] = None
    return tuple(dict(c) for c in fitted)


def _fit_configs(kernel: Kernel) -> tuple[dict[str, int], ...]:
    """Reduction configs, with RBLOCK no wider than a row of known length needs."""
    rnumel = kernel.reduction_range
    if not isinstance(rnumel, int):
        return REDUCTION_CONFIGS
    widest = max(16, 1 << max(rnumel - 1, 0).bit_length())
    fitted = {tuple(sorted({**c, "RBLOCK": min(c["RBLOCK"], widest)}.items()))
              for c in REDUCTION_CONFIGS}
    return tuple(dict(c) for c in sorted(fitted))


def _autotune(kernel: Kernel, configs: Sequence[dict[str, int]]) -> str:
    """The triton.autotune decorator: `configs`, re-tuned for each distinct set of sizes."""
    parts = []
    for c in configs:
        blocks = {k: v for k, v in c.items() if k in ("XBLOCK", "RBLOCK")}
        options = "".join(f", {k}={v}" for k, v in c.items() if k not in blocks)
        parts.append(f"        triton.Config({blocks!r}{options}),")
    key = [s.name for s in kernel.size_args]
    return "\n".join(["@triton.autotune(", "    configs=[", *parts, "    ],",
                      f"    key={key!r},", ")"])


def render_source(kernels: list[Kernel], decorators: dict[str, str]) -> str:
    """One module holding every kernel of a graph, each under its autotune decorator (kernels
    missing from `decorators` get none)."""
    parts = ['"""Triton kernels generated by jitopt."""', triton_kernel.PRELUDE]
    for k in kernels:
        decorator = decorators.get(k.name)
        kernel = triton_kernel.render_kernel(k).rstrip()
        parts.append(f"{decorator}\n{kernel}" if decorator else kernel)
    return "\n\n\n".join(parts) + "\n"


def load_module(source: str, root: Path | None = None) -> ModuleType:
    """Import generated source from a file (Triton reads a kernel's source back through
    inspect, so it must live in one), named by its hash under the kernel cache."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    directory = (root or default_cache_dir()) / "triton"
    path = directory / f"kernels_{digest}.py"
    if not path.exists() or path.read_text() != source:
        _write_atomically(path, source)
    name = f"jitopt_triton_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # some Triton paths look the defining module up by name
    spec.loader.exec_module(module)
    return module


def _write_atomically(path: Path, text: str) -> None:
    """Concurrent compiles see either no file or a whole one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kernels.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render_launcher(name: str, kernel: Kernel, signature: lowering.KernelSignature,
                    gm: fx.GraphModule, device_type: str) -> str:
    """Python that checks the kernel's layout assumptions, allocates outputs on the group's
    device and launches the kernel over the rows or points."""
    params, tensor_args = tensor_params(gm)
    lines = [f"def {name}({', '.join(params)}):"]
    for symbol, i, dim in signature.size_sources:  # (symbolic strides are checked in these)
        lines.append(f"    {symbol.name} = {tensor_args[i]}.shape[{dim}]")
    for arg, (shape, strides, _) in zip(tensor_args, signature.inputs):
        lines += layout_check(arg, shape, strides)
    outs = []
    for k, (shape, strides, dtype) in enumerate(signature.outputs):
        outs.append(f"out{k}")
        lines.append(f"    out{k} = empty_strided({size_tuple(shape)}, {size_tuple(strides)}, "
                     f"dtype={dtype}, device=device)")
    args = tensor_args + outs + [s.name for s in kernel.size_args]
    lines.append(f"    xnumel = {index_source(triton_kernel.grid_numel(kernel))}")
    lines += _launch(args, device_type)
    lines.append(f"    return {outs[0]}" if returns_single(gm) else
                 f"    return ({', '.join(outs)},)")
    return "\n".join(lines) + "\n"


def _launch(args: list[str], device_type: str) -> list[str]:
    """The launch, skipped for an empty grid; on CUDA under the device's guard (Triton
    launches on the current device)."""
    call = (f'kernel[lambda meta: (triton.cdiv(xnumel, meta["XBLOCK"]),)]'
            f"({', '.join(args)})")
    if device_type != "cuda":
        return ["    if xnumel > 0:", f"        {call}"]
    return ["    if xnumel > 0:", "        with torch.cuda.device(device):", f"            {call}"]


def build_launcher(source: str, name: str, kernel: Any, device: torch.device
                   ) -> Callable[..., Any]:
    """Execute a generated launcher's source with its kernel and the group's device."""
    import triton

    namespace: dict[str, Any] = {"torch": torch, "triton": triton, "kernel": kernel,
                                 "relayout": relayout, "empty_strided": torch.empty_strided,
                                 "device": device}
    exec(compile(source, f"<jitopt launcher {name}>", "exec"), namespace)
    return namespace[name]


def group_device(gm: fx.GraphModule) -> torch.device:
    """The device a group's outputs live on (Dynamo guards on it, so it is fixed per graph)."""
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    first = output[0] if isinstance(output, (tuple, list)) else output
    return lowering.meta(first).device
