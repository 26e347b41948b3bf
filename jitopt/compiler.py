"""The compile pipeline: Dynamo graph -> ATen (capture) -> passes -> partitions -> runtime."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import gc
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from jitopt import capture, quantization_report
from jitopt.codegen.partition import partition_graph
from jitopt.codegen.python_wrapper import render_wrapper
from jitopt.config import Config, resolve
from jitopt.debug import DumpDir, counters, log
from jitopt.errors import JitoptFallbackWarning
from jitopt.passes import (CPP_KERNEL_PASSES, INFERENCE_ONLY, PIPELINE, QUANTIZE_PASSES,
                           QUANTIZING, run_passes)
from jitopt.passes.rewrite_kv_cache import rewrite_kv_cache
from jitopt.passes.constants import meta_like
from jitopt.passes.graph_facts import is_mutated
from jitopt.report import AtenGraphReport, GraphReport, discard_graph_report, new_graph_report
from jitopt.runtime.compiled_graph import CompiledGraph, FrozenInput

# How many sets of frozen weights one graph keeps compiled before it stops freezing (a graph
# shared by several module instances sees a different set per instance).
MAX_FROZEN_VARIANTS = 8


def backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, mode: str | None = None,
            options: dict[str, Any] | None = None) -> Callable[..., Any]:
    """The Dynamo backend registered as "jitopt": `torch.compile(m, backend="jitopt")`."""
    with _gc_paused():
        return compile_graph(gm, example_inputs, resolve(options, mode))


@contextlib.contextmanager
def _gc_paused():
    """Compiling allocates many short-lived objects on top of Dynamo's large heap, so Python's
    cyclic collector runs full passes over that heap mid-compile (a fifth of BERT's compile
    time). Nothing we build is cyclic garbage worth collecting before we return."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any],
                  config: Config) -> Callable[..., Any]:
    """Compile one Dynamo graph; on an internal error, run it as captured (see Config.on_error)."""
    start = time.perf_counter()
    report = new_graph_report(
        dynamo_ops=sum(n.op in ("call_function", "call_method", "call_module")
                       for n in gm.graph.nodes),
        inputs=len(example_inputs),
        symbolic_inputs=sum(isinstance(x, torch.SymInt) for x in example_inputs))
    weights = ({i: example_inputs[i] for i in capture.param_buffer_inputs(gm)}
               if config.freeze_weights else {})

    def aten_compiler(kind: str):
        def compile_aten(aten_gm: fx.GraphModule, aot_inputs: Sequence[Any]):
            # Dynamo's inputs are this graph's when nothing was added or dropped on the way.
            same = kind == "inference" and len(aot_inputs) == len(example_inputs)
            return _compile_aten(aten_gm, kind, config, report, weights if same else {},
                                 capture.concrete_inputs(example_inputs) if same else None)
        return compile_aten

    try:
        compiled = _capture(gm, example_inputs, aten_compiler)
    except Exception as e:
        if capture.is_dynamo_restart(e):
            discard_graph_report(report)
            raise
        _fall_back(config, report.fallbacks, "capture to ATen", e)
        compiled = gm.forward
    report.seconds = time.perf_counter() - start
    counters["graphs"]["captured"] += 1
    return compiled


def _capture(gm: fx.GraphModule, example_inputs: Sequence[Any],
             aten_compiler: Callable[[str], capture.AtenCompiler]) -> Callable[..., Any]:
    """Capture to ATen: straight through make_fx for plain inference, else AOTAutograd."""
    traced = capture.trace_inference(gm, example_inputs)
    if traced is not None:
        counters["graphs"]["captured_direct"] += 1
        return capture.unboxed(aten_compiler("inference")(traced, example_inputs))
    return capture.lower_to_aten(gm, example_inputs, inference=aten_compiler("inference"),
                                 forward=aten_compiler("forward"),
                                 backward=aten_compiler("backward"))


def _compile_aten(aten_gm: fx.GraphModule, kind: str, config: Config, graph: GraphReport,
                  weights: dict[int, torch.Tensor],
                  examples: list[Any] | None = None) -> Callable[..., Any]:
    report = AtenGraphReport(kind)
    graph.aten.append(report)
    start = time.perf_counter()
    try:
        variants = _FrozenVariants(aten_gm, kind, config, report)
        return variants.build(weights, examples)
    except Exception as e:
        if capture.is_dynamo_restart(e):
            raise
        _fall_back(config, report.fallbacks, f"{kind} graph pipeline", e)
        return capture.boxed(aten_gm)
    finally:
        report.seconds = time.perf_counter() - start


class _FrozenVariants:
    """Builds the compiled graph for one set of frozen weights, and another when a call brings
    different or changed weights; after MAX_FROZEN_VARIANTS sets it compiles once unfrozen."""

    def __init__(self, aten_gm: fx.GraphModule, kind: str, config: Config,
                 report: AtenGraphReport) -> None:
        self.original = fx.GraphModule(aten_gm, copy.deepcopy(aten_gm.graph))
        self.kind, self.config, self.report = kind, config, report
        self.weight_inputs: list[int] = []
        self.variants: list[CompiledGraph] = []
        self.unfrozen: CompiledGraph | None = None

    def build(self, weights: dict[int, torch.Tensor],
              examples: list[Any] | None = None) -> CompiledGraph:
        self.weight_inputs = sorted(weights)
        gm = fx.GraphModule(self.original, copy.deepcopy(self.original.graph))
        frozen = _freeze_inputs(gm, weights)
        if self.config.quantize == "int8-static":
            _attach_calibration(gm)
        self.report.frozen_inputs = len(frozen)
        measuring = self.config.quantize is not None and examples is not None
        reference = fx.GraphModule(gm, copy.deepcopy(gm.graph)) if measuring else None
        gm.meta["quantize_group_size"] = self.config.quantize_group_size
        if measuring and self.config.quantize == "int8":
            gm.meta["activation_absmax"] = quantization_report.activation_absmax(
                reference, examples)
        gm.meta["kv_cache_max_tokens"] = self.config.kv_cache_max_tokens
        if measuring and (self.config.quantize_min_sqnr_db is not None
                          or self.config.quantize_max_error is not None):
            gm.meta["quantize_keep"] = _over_budget(reference, examples, self.config,
                                                    gm.meta.get("activation_absmax"))
        dump = DumpDir(self.config.debug_dir, self.kind)
        wrapper = _lower(gm, self.kind, self.config, self.report, dump)
        compiled = CompiledGraph(wrapper.source, wrapper.bindings, name=self.kind,
                                 frozen=frozen, on_stale=self.on_stale if frozen else None,
                                 cuda_graph_inputs=self._cuda_graph_inputs(
                                     frozen, gm, wrapper.source),
                                 profiled_source=wrapper.profiled_source)
        if frozen:
            self.variants.append(compiled)
        if measuring and self.report.quantized_layers:
            self.report.quantization_error = quantization_report.measure(
                reference, compiled, examples, self.report.quantized_layers,
                _layer_quantizer(self.config, gm.meta.get("activation_absmax")))
        _return_freed_memory()
        return compiled

    def _cuda_graph_inputs(self, frozen: list[FrozenInput], gm: fx.GraphModule,
                           source: str) -> list[int] | None:
        """The inputs a CUDA graph replay copies in, where one may replay this graph: an
        inference graph with static sizes, every input but the frozen weights a CUDA
        tensor, and no Python runtime function (the KV-cache append decides per call)."""
        if not self.config.cuda_graphs or self.kind != "inference" or (
                "python_function(" in source):
            return None
        vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
        weights = {f.index for f in frozen}
        live = [i for i in range(len(vals)) if i not in weights]
        if not live or not all(isinstance(vals[i], torch.Tensor) and vals[i].is_cuda
                               and not capture.has_symbolic_size(vals[i]) for i in live):
            return None
        return live

    def on_stale(self, args: list) -> CompiledGraph:
        for variant in self.variants:
            if all(f.matches(args[f.index]) for f in variant._frozen):
                return variant
        counters["graphs"]["recompiled_for_weights"] += 1
        # A variant whose very tensors were changed in place can never match again.
        self.variants = [v for v in self.variants
                         if not all(f.tensor is args[f.index] for f in v._frozen)]
        if len(self.variants) < MAX_FROZEN_VARIANTS:
            log.info("jitopt: frozen weights differ from the compiled ones; recompiling")
            return self.build({i: args[i] for i in self.weight_inputs})
        if self.unfrozen is None:
            log.info("jitopt: %d weight sets seen by one graph; compiling it unfrozen",
                     len(self.variants))
            self.unfrozen = self.build({})
        return self.unfrozen


def _attach_calibration(gm: fx.GraphModule) -> None:
    """Give each convolution its calibrated input range; warn when none has one."""
    from jitopt.calibration import attach_input_ranges

    convs = sum(n.target is torch.ops.aten.convolution.default for n in gm.graph.nodes)
    if convs and not attach_input_ranges(gm):
        warnings.warn(f"jitopt: quantize='int8-static' found no calibrated input range for "
                      f"this graph's {convs} convolution(s), which stay fp32; run "
                      f"jitopt.calibrate(model, batches) before compiling", JitoptFallbackWarning,
                      stacklevel=2)


def _over_budget(reference: fx.GraphModule, examples: list[Any], config: Config,
                 absmax: dict | None) -> dict[str, str]:
    """Layer name -> why it stays fp32, for each layer the budgets rule out: the per-layer
    SQNR floor first, then the end-to-end error among the layers left."""
    quantizer = _layer_quantizer(config, absmax)
    sqnrs = quantization_report.linear_sqnrs(reference, examples, quantizer) or {}
    floor = config.quantize_min_sqnr_db
    keep = {} if floor is None else {
        name: f"output SQNR {db:.1f} dB on the example inputs is below the budget of "
              f"{floor:g} dB" for name, db in sqnrs.items() if db < floor}
    if config.quantize_max_error is not None:
        rest = {name: db for name, db in sqnrs.items() if name not in keep}
        keep.update(quantization_report.keep_for_error_budget(
            reference, examples, quantizer, config.quantize_max_error, rest))
    return keep


def _layer_quantizer(config: Config, absmax: dict | None = None
                     ) -> quantization_report.LayerQuantizer:
    return quantization_report.LayerQuantizer(config.quantize, config.quantize_group_size,
                                              absmax)


def _freeze_inputs(gm: fx.GraphModule, weights: dict[int, torch.Tensor]) -> list[FrozenInput]:
    """Turn weight inputs into get_attr constants; the placeholder stays (same signature)."""
    frozen = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, tensor in sorted(weights.items()):
        node = placeholders[i]
        if not _freezable(tensor, node):
            continue
        name = f"frozen_{node.name}"
        gm.register_buffer(name, tensor, persistent=False)
        with gm.graph.inserting_after(placeholders[-1]):
            const = gm.graph.get_attr(name)
        const.meta["val"] = meta_like(tensor)
        node.replace_all_uses_with(const)
        frozen.append(FrozenInput(i, tensor))
    return frozen


def _freezable(tensor: torch.Tensor, node: fx.Node) -> bool:
    """Can `tensor` become a constant for placeholder `node`? Not when version counters cannot
    guard it (inference tensors, subclasses with no plain storage), when the graph writes into
    it, or when it does not look like what was traced."""
    val = node.meta.get("val")
    return (type(tensor) in (torch.Tensor, torch.nn.Parameter) and not tensor.is_inference()
            and not is_mutated(node) and isinstance(val, torch.Tensor)
            and tensor.shape == val.shape and tensor.dtype == val.dtype)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):  # no C library to open by that name (Windows)
        return None


def _return_freed_memory() -> None:
    """Hand the heap memory a compile freed back to the OS (glibc's malloc_trim; elsewhere
    nothing). Why: rounding, packing and measuring weights frees weight-sized temporaries,
    and glibc keeps freed heap pages resident (its mmap threshold rises to the largest block
    freed, up to 32 MB, so later weight-sized blocks come from the heap). BERT-base's
    int8-weight-only compile left 1163 MB resident above eager, 140 MB after this (89 ms;
    0.3 ms when little was freed)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


MATMULS = (torch.ops.aten.addmm.default, torch.ops.aten.mm.default, torch.ops.aten.bmm.default)
# What each linear quantize mode rewrites, for the warning when it rewrote nothing.
_LINEAR_MODES = "linears over frozen weights (float32 on CPU; any float dtype on CUDA)"
QUANTIZE_SCOPE = {"int8": _LINEAR_MODES, "int8-weight-only": _LINEAR_MODES,
                  "int4-weight-only": _LINEAR_MODES,
                  "bf16": "linears over frozen float32 weights on CPU",
                  "fp16": "linears over frozen float32 weights on CPU"}


def _over_frozen_weight(node: fx.Node) -> bool:
    """A matmul whose second operand is a frozen weight, or a view of one (before folding)."""
    if node.target not in MATMULS or not isinstance(node.args[-1], fx.Node):
        return False
    weight = node.args[-1]
    if weight.op == "call_function" and weight.args and isinstance(weight.args[0], fx.Node):
        weight = weight.args[0]  # t(w), a permute or view of it
    return weight.op == "get_attr"


def _lower(gm: fx.GraphModule, kind: str, config: Config, report: AtenGraphReport,
           dump: DumpDir):
    report.ops_captured = _count_ops(gm)
    layers = sum(map(_over_frozen_weight, gm.graph.nodes))
    dump.write("captured.py", lazy=lambda: gm.print_readable(print_output=False))
    passes = [p for p in PIPELINE if p.__name__ not in config.disabled_passes
              and (kind == "inference" or p not in INFERENCE_ONLY)
              and (p not in QUANTIZING or p in QUANTIZE_PASSES.get(config.quantize, ()))
              and (p is not rewrite_kv_cache or config.kv_cache)
              # their ops are fast only as the CPU target's kernels (elsewhere: ATen's
              # references)
              and (p not in CPP_KERNEL_PASSES or "cpp" in config.targets)]
    with capture.real_tensors():
        records = run_passes(gm, passes, verify_each=config.verify == "each",
                             dump=lambda name, text: dump.write(name, lazy=text))
    report.quantized_layers = gm.meta.get("quantized_layers", [])
    if config.quantize in QUANTIZE_SCOPE and kind == "inference" and layers and \
            not report.quantized_layers:
        warnings.warn(f"jitopt: quantize={config.quantize!r} changed none of this graph's "
                      f"{layers} matmul{'s' * (layers != 1)} over frozen weights (it takes "
                      f"{QUANTIZE_SCOPE[config.quantize]}); they "
                      "run in the graph's own precision", stacklevel=2)
    report.constant_bytes = _constant_bytes(gm)
    for r in records:
        counters["passes"][r.name] += r.changed
    report.passes = [vars(r) for r in records]
    artifacts, partitions = partition_graph(
        gm, config.targets, on_error=config.on_error,
        background=config.background_compile and config.on_error != "raise")
    report.partitions = [vars(p) for p in partitions]
    report.fallbacks += [f"partition {p.name}: {p.fallback_reason}" for p in partitions
                         if p.fallback_reason]
    counters["fallbacks"]["partition"] += sum(bool(p.fallback_reason) for p in partitions)
    counters["targets"]["declined_partitions"] += sum(bool(p.declined_reason)
                                                      for p in partitions)
    report.ops_final = _count_ops(gm)
    _record_kernels(artifacts, report, dump)
    wrapper = render_wrapper(gm, artifacts, title=f"jitopt {kind} graph")
    report.wrapper_source = wrapper.source
    dump.write("wrapper.py", wrapper.source)
    counters["graphs"][f"compiled_{kind}"] += 1
    log.debug("jitopt: compiled %s graph: %d ATen ops -> %d, %d weights frozen", kind,
              report.ops_captured, report.ops_final, report.frozen_inputs)
    return wrapper


def _constant_bytes(gm: fx.GraphModule) -> dict[str, int]:
    """Bytes of the constants the compiled graph holds (frozen, folded, packed, quantized
    weights), by dtype; an unused one was already dropped by dead-code elimination."""
    held: dict[str, int] = {}
    for node in gm.graph.nodes:
        value = getattr(gm, node.target, None) if node.op == "get_attr" else None
        if isinstance(value, torch.Tensor):
            dtype = str(value.dtype).removeprefix("torch.")
            held[dtype] = held.get(dtype, 0) + value.nbytes  # packed ones have no storage
    return held


def _record_kernels(artifacts: dict[str, Any], report: AtenGraphReport, dump: DumpDir) -> None:
    """Generated source goes in the report (report.kernel_sources) and the debug dump."""
    sources: dict[str, None] = {}
    for name, artifact in artifacts.items():
        library = getattr(artifact, "library_source", None)
        if library is None:
            continue
        sources[library] = None
        dump.write(f"launcher_{name}.py", artifact.launcher_source)
        counters["targets"][f"{artifact.target}_partitions"] += 1
        suffix = artifact.source_suffix
    for k, source in enumerate(sources):
        dump.write(f"kernels_{k}.{suffix}", source)
    report.kernel_sources = list(sources)


def _count_ops(gm: fx.GraphModule) -> int:
    return sum(n.op in ("call_function", "call_module") for n in gm.graph.nodes)


def _fall_back(config: Config, fallbacks: list[str], stage: str, error: Exception) -> None:
    if config.on_error == "raise":
        raise error
    reason = f"{stage} failed: {type(error).__name__}: {error}"
    fallbacks.append(reason)
    counters["fallbacks"][stage] += 1
    warnings.warn(f"jitopt: {reason}; this graph runs on ATen (uncompiled) instead",
                  JitoptFallbackWarning, stacklevel=2)
