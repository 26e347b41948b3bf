"""The other inference engines people reach for on CPU, adapted so the harness can time them next
to eager PyTorch.

Every factory takes an eval-mode module whose forward takes positional tensors and returns one
tensor, converts it once for the example shapes (static shapes: the harness calls with those
only), checks that the engine really runs as named with the requested thread count, and returns
a callable with the module's signature that returns a torch.Tensor. An engine that cannot run
here raises `Unavailable`; one that is installed but fails on a model raises whatever it raised.

Numerics: every engine is pinned to float32. OpenVINO's CPU plugin otherwise runs in bfloat16 on
CPUs with AMX / AVX512-BF16 (its default INFERENCE_PRECISION_HINT there), which would compare a
lower-precision result against fp32 eager.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import logging
import operator
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import numpy as np
import torch

from benchmarks.backends import Unavailable  # one class for every column's "cannot run here"

Runner = Callable[..., torch.Tensor]
RunnerFactory = Callable[[torch.nn.Module, tuple[torch.Tensor, ...], int], Runner]



def _require(module: str) -> ModuleType:
    """Import `module` or raise Unavailable saying why (a broken native library counts too)."""
    try:
        return importlib.import_module(module)
    except (ImportError, OSError) as e:
        raise Unavailable(f"{module} is not importable: {e}") from e


def _check_threads(threads: int) -> None:
    # 0 means "all cores" to both ONNX Runtime and OpenVINO: refuse it, a benchmark row must say
    # how many threads it used.
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")


def _summary(error: BaseException | str) -> str:
    """The part of an error worth a table cell: OpenVINO's conversion reports run to dozens of
    lines and only their "Summary:" names the ops; otherwise the first line."""
    text = str(error).strip()
    if "Summary:" in text:
        return " ".join(text.split("Summary:")[-1].split())
    return text.splitlines()[0] if text else type(error).__name__


def _to_numpy(inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    return [t.detach().cpu().contiguous().numpy() for t in inputs]


# --------------------------------------------------------------------------------------------
# ONNX Runtime


def _export_onnx(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...],
                 path: str, names: list[str]) -> None:
    """Export to `path` with torch's default exporter, else with the legacy one (and say so).

    torch 2.13's default exporter (dynamo=True: torch.export + onnxscript) exports all four
    reference models (MLP, CNN, HF GPT-2, HF BERT). The legacy TorchScript exporter is only a
    fallback: it fails on transformers 5's GPT-2 (no ONNX symbolic for aten::diff, used by the
    causal-mask code) and is deprecated.
    """
    with torch.no_grad():
        try:
            # verbose=False silences the exporter's "[torch.onnx] ..." progress lines on stdout.
            torch.onnx.export(model, example_inputs, path, input_names=names, verbose=False)
            return
        except Exception as dynamo_error:  # noqa: BLE001 - any exporter failure: try the other
            try:
                torch.onnx.export(model, example_inputs, path, input_names=names, dynamo=False)
            except Exception as legacy_error:
                raise RuntimeError(f"torch.onnx.export failed with both exporters: dynamo: "
                                   f"{_summary(dynamo_error)}; torchscript: "
                                   f"{_summary(legacy_error)}") from legacy_error
            warnings.warn(f"the dynamo ONNX exporter failed ({_summary(dynamo_error)}); "
                          "exported with the TorchScript one", stacklevel=3)


def _ort_session(ort: ModuleType, path: str, threads: int) -> Any:
    """An ORT InferenceSession on the CPU provider only, with `threads` intra-op threads."""
    # ORT's intra-op workers spin-wait briefly after each run (its default, kept: it is what
    # users get); with threads > 1 that shows as extra CPU time, not as extra latency.
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # one graph, run sequentially: no inter-op pool
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's idle threads spin after each run by default, stealing the cores from whatever the
    # harness times next (it interleaves backends); make them sleep instead.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    # An unknown or unusable provider makes ORT fall back silently; make sure it did not.
    if session.get_providers() != ["CPUExecutionProvider"]:
        raise RuntimeError(f"ONNX Runtime picked providers {session.get_providers()}")
    return session


def onnxruntime_runner(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...],
                       threads: int) -> Runner:
    """Export `model` to ONNX once and run it with ONNX Runtime's CPU execution provider.

    The session uses `threads` intra-op threads, no inter-op parallelism and every graph
    optimization. The returned callable takes the same positional tensors as the model.
    """
    ort = _require("onnxruntime")
    _check_threads(threads)
    names = [f"input_{i}" for i in range(len(example_inputs))]
    # The session holds the weights once built, so the files (model.onnx and, for big models,
    # its external model.onnx.data) can go right after.
    with tempfile.TemporaryDirectory(prefix="jitopt-onnx-", ignore_cleanup_errors=True) as tmp:
        path = os.path.join(tmp, "model.onnx")
        _export_onnx(model, example_inputs, path, names)
        session = _ort_session(ort, path, threads)
    # Exporters drop inputs the graph never reads, so feed by name, not by position.
    kept = {i.name for i in session.get_inputs()}
    feed_index = [(name, i) for i, name in enumerate(names) if name in kept]
    if len(session.get_outputs()) != 1:
        raise RuntimeError(f"expected one ONNX output, got {len(session.get_outputs())}")

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        arrays = _to_numpy(inputs)
        out = session.run(None, {name: arrays[i] for name, i in feed_index})[0]
        return torch.from_numpy(out)

    return run


# --------------------------------------------------------------------------------------------
# OpenVINO: convert_model + compile_model


def _openvino_config(threads: int) -> dict[str, Any]:
    """compile_model properties shared by both OpenVINO runners."""
    import openvino.properties as props
    import openvino.properties.hint as hints
    from openvino import Type

    return {
        props.inference_num_threads: threads,
        hints.performance_mode: hints.PerformanceMode.LATENCY,
        hints.inference_precision: Type.f32,  # not bf16: see the module docstring
    }


def _check_openvino_compiled(compiled: Any, threads: int) -> None:
    """Raise unless `compiled` (an ov.CompiledModel) runs on CPU, fp32, with `threads` threads."""
    from openvino import Type

    devices = list(compiled.get_property("EXECUTION_DEVICES"))
    got_threads = compiled.get_property("INFERENCE_NUM_THREADS")
    precision = compiled.get_property("INFERENCE_PRECISION_HINT")
    if devices != ["CPU"] or got_threads != threads or precision != Type.f32:
        raise RuntimeError(f"OpenVINO compiled for devices={devices}, threads={got_threads}, "
                           f"precision={precision}; wanted CPU, {threads}, f32")


def _convert_openvino(ov: ModuleType, model: torch.nn.Module,
                      example_inputs: tuple[torch.Tensor, ...]) -> Any:
    """ov.convert_model on the module (TorchScript tracing inside), else on torch.export's program.

    Tracing the module is OpenVINO's documented path, but with torch 2.13 + transformers 5 it
    fails on GPT-2 (no conversion rule for aten::diff); the ExportedProgram path converts it.
    """
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.13 deprecates torch.jit.trace, which convert_model uses for modules.
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace", category=category)
        try:
            ov_model = ov.convert_model(model, example_input=example_inputs)
        except Exception as trace_error:  # noqa: BLE001 - any conversion failure: try torch.export
            try:
                exported = torch.export.export(model, example_inputs)
                ov_model = ov.convert_model(exported)
            except Exception as export_error:
                raise RuntimeError(f"openvino.convert_model failed on the module "
                                   f"({_summary(trace_error)}) and on torch.export's program "
                                   f"({_summary(export_error)})") from export_error
    if len(ov_model.inputs) != len(example_inputs):
        raise RuntimeError(f"OpenVINO model has {len(ov_model.inputs)} inputs, the module "
                           f"{len(example_inputs)}")
    # Both paths leave some dimensions dynamic; pin the example shapes like the ONNX export does
    # so the CPU plugin can specialise.
    ov_model.reshape({port: ov.PartialShape(list(t.shape))
                      for port, t in zip(ov_model.inputs, example_inputs)})
    return ov_model


def openvino_runner(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...],
                    threads: int) -> Runner:
    """Convert `model` with openvino.convert_model once and run it with OpenVINO's CPU plugin.

    Compiled with INFERENCE_NUM_THREADS=threads, the LATENCY performance hint (one stream) and
    fp32 precision. The returned callable takes the same positional tensors as the model.
    """
    ov = _require("openvino")
    _check_threads(threads)
    ov_model = _convert_openvino(ov, model, example_inputs)
    if len(ov_model.outputs) != 1:
        raise RuntimeError(f"expected one OpenVINO output, got {len(ov_model.outputs)}")
    compiled = ov.Core().compile_model(ov_model, "CPU", _openvino_config(threads))
    _check_openvino_compiled(compiled, threads)
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        # infer() copies the result out by default (share_outputs=False): the tensor we return
        # stays valid after the next call.
        return torch.from_numpy(request.infer(_to_numpy(inputs))[output])

    return run


# --------------------------------------------------------------------------------------------
# OpenVINO: torch.compile(backend="openvino")

# openvino.torch's backend reports its own failures only at DEBUG level and then quietly runs the
# graph elsewhere: Inductor when converting fails, eager PyTorch when executing fails (for good).
_OV_DYNAMO_LOGGER = "openvino.frontend.pytorch.torchdynamo"
_OV_FALLBACK_MESSAGES = ("Failed in OpenVINO execution", "Falling back to native PyTorch")
_OV_SUCCESS_MESSAGE = "OpenVINO graph execution successful"


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _openvino_debug_log() -> Iterator[_Recorder]:
    """Record what the openvino.torch backend logs, DEBUG included, without printing it."""
    parent = logging.getLogger(_OV_DYNAMO_LOGGER)
    backend = logging.getLogger(_OV_DYNAMO_LOGGER + ".backend")  # pins itself to WARNING
    saved = (parent.level, parent.propagate, backend.level)
    recorder = _Recorder()
    parent.addHandler(recorder)
    parent.setLevel(logging.DEBUG)
    backend.setLevel(logging.DEBUG)
    parent.propagate = False  # the DEBUG records dump whole graphs; keep them off the console
    try:
        yield recorder
    finally:
        parent.removeHandler(recorder)
        parent.setLevel(saved[0])
        parent.propagate = saved[1]
        backend.setLevel(saved[2])
        for record in recorder.records:  # hand on what would have been shown anyway
            if record.levelno >= logging.WARNING:
                parent.handle(record)


def _openvino_partitions() -> tuple[dict[str, Any], dict[int, Any]]:
    """The backend's global caches: partitioned graphs by signature, CompiledModels by partition."""
    from openvino.frontend.pytorch.torchdynamo import execute

    return execute.partitioned_modules, execute.compiled_cache


def _check_openvino_backend_ran(records: list[logging.LogRecord],
                                graphs: list[torch.fx.GraphModule], compiled_models: list[Any],
                                threads: int) -> None:
    """Raise if the warm-up call ran anywhere but OpenVINO's CPU plugin; warn about ops it left
    to PyTorch (the backend partitions the graph and runs unsupported ops in eager)."""
    messages = [record.getMessage() for record in records]
    fallbacks = [m for m in messages if any(text in m for text in _OV_FALLBACK_MESSAGES)]
    if fallbacks:
        raise RuntimeError("torch.compile(backend='openvino') fell back: "
                           + _summary(fallbacks[0]))
    if not compiled_models or not any(_OV_SUCCESS_MESSAGE in m for m in messages):
        # Seen when dynamo hit torch._dynamo.config.recompile_limit: forward code shared by
        # many compiled models (a wrapper class) then runs eagerly, without telling the caller.
        raise RuntimeError("torch.compile(backend='openvino') compiled no new OpenVINO graph "
                           "for this model (dynamo's recompile_limit reached? call "
                           "torch._dynamo.reset() between models)")
    for compiled in compiled_models:
        _check_openvino_compiled(compiled, threads)
    outside = sorted({str(node.target) for graph in graphs for node in graph.graph.nodes
                      if node.op == "call_function" and node.target is not operator.getitem})
    if outside:
        warnings.warn(f"torch.compile(backend='openvino') runs these ops in PyTorch: {outside}",
                      stacklevel=3)


def openvino_compile_runner(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...],
                            threads: int) -> Runner:
    """torch.compile(model, backend="openvino"), compiled and checked with one warm-up call.

    Same OpenVINO properties as `openvino_runner`. Raises if the backend silently fell back to
    Inductor or eager PyTorch. Calls run under torch.no_grad(), as the warm-up did, so they hit
    the graph compiled for inference.
    """
    _require("openvino.torch")  # importing it registers the "openvino" dynamo backend
    _check_threads(threads)
    backend = torch._dynamo.lookup_backend("openvino")
    if not backend.__module__.startswith("openvino."):
        raise RuntimeError(f'torch.compile backend "openvino" is {backend.__module__}')
    # aot_autograd=True: with torch 2.13 the backend's default path (make_fx on dynamo's graph)
    # breaks dynamo's guards on any convolution ("sources must not be empty for symbol s..."),
    # the AOTAutograd path handles all four reference models. (The backend keeps these options in
    # a module global once aot_autograd is set; every runner sets the same keys, so no leak.)
    options = {"device": "CPU", "aot_autograd": True, "config": _openvino_config(threads)}
    compiled = torch.compile(model, backend="openvino", dynamic=False, options=options)
    graphs, models = _openvino_partitions()
    graphs_before, models_before = set(graphs), set(models)
    with torch.no_grad(), _openvino_debug_log() as log:
        compiled(*example_inputs)
    new_graphs = [graph for key, graph in graphs.items() if key not in graphs_before]
    new_models = [ov_model for key, ov_model in models.items() if key not in models_before]
    _check_openvino_backend_ran(log.records, new_graphs, new_models, threads)

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return compiled(*inputs)

    return run


# --------------------------------------------------------------------------------------------
# Torch-TensorRT


def torch_tensorrt_runner(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...],
                          threads: int) -> Runner:
    """Compile `model` with Torch-TensorRT (dynamo IR, fp32) on the current CUDA device.

    Raises Unavailable without CUDA or torch_tensorrt. `threads` does not apply (GPU). The
    returned callable copies inputs to the GPU and the output back, so its timing includes both
    transfers; that keeps it comparable to the CPU engines, which take and return CPU tensors.
    """
    missing = []
    if not torch.cuda.is_available():
        missing.append(f"no CUDA device (torch {torch.__version__})")
    if importlib.util.find_spec("torch_tensorrt") is None:
        missing.append("torch_tensorrt is not installed")
    if missing:
        raise Unavailable("needs NVIDIA GPU + TensorRT: " + ", ".join(missing))
    torch_tensorrt = _require("torch_tensorrt")
    device = torch.device("cuda")
    gpu_model = copy.deepcopy(model).to(device)  # leave the caller's CPU model where it is
    gpu_inputs = [t.to(device) for t in example_inputs]
    with torch.no_grad():
        trt_model = torch_tensorrt.compile(gpu_model, ir="dynamo", inputs=gpu_inputs,
                                           enabled_precisions={torch.float32})

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return trt_model(*(t.to(device) for t in inputs)).cpu()  # .cpu() synchronises

    return run


PEERS: dict[str, RunnerFactory] = {
    "onnxruntime": onnxruntime_runner,
    "openvino": openvino_runner,
    "openvino-compile": openvino_compile_runner,
    "torch-tensorrt": torch_tensorrt_runner,
}
