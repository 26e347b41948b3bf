"""The one place jitopt touches PyTorch's private compiler APIs: AOTAutograd, the decomposition
tables, fake-tensor mode and Dynamo's graph metadata. A torch upgrade should change only this."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._decomp import get_decompositions
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

from jitopt.passes.graph_facts import writes_input

aten = torch.ops.aten

# Deliberately short. The ATen target runs library kernels (matmul, convolution, norms,
# softmax, attention) far faster than their decompositions, and our passes match them whole,
# so those stay. Decomposed here: ops that are thin compositions of pointwise ops with no
# faster kernel of their own, so later fusion (codegen issue) sees one vocabulary.
DECOMPOSITIONS = get_decompositions([
    aten.addcmul,
    aten.addcdiv,
    aten.lerp,
    aten.hardsigmoid,
    aten.hardswish,
    aten.hardtanh,
    aten.mish,
    aten.logit,
])

AtenCompiler = Callable[[fx.GraphModule, Sequence[Any]], Callable[..., Any]]


def lower_to_aten(gm: fx.GraphModule, example_inputs: Sequence[Any], *,
                  inference: AtenCompiler, forward: AtenCompiler,
                  backward: AtenCompiler) -> Callable[..., Any]:
    """Trace Dynamo's graph to functional ATen with AOTAutograd. AOTAutograd decides the mode:
    `inference` when nothing needs a gradient, else `forward` and (lazily) `backward`."""
    return aot_module_simplified(
        gm, example_inputs,
        fw_compiler=forward, bw_compiler=backward, inference_compiler=inference,
        decompositions=DECOMPOSITIONS,
        # Input mutations stay in the inference graph as copy_ into the input, instead of an
        # epilogue AOTAutograd runs in Python after the graph.
        keep_inference_input_mutations=True,
    )


def trace_inference(gm: fx.GraphModule,
                    example_inputs: Sequence[Any]) -> fx.GraphModule | None:
    """Trace Dynamo's graph straight to ATen with make_fx when AOTAutograd has nothing to add:
    no gradients, plain tensors, no constants but fresh ones and no op that writes. Saves
    AOTAutograd's metadata pass and functionalization, about half of capture time, and its
    runtime wrappers on every call. None when the graph needs AOTAutograd."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._guards import detect_fake_mode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    fake_mode = detect_fake_mode(example_inputs)
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    if (fake_mode is None or any(is_traceable_wrapper_subclass(x) for x in tensors)
            or (torch.is_grad_enabled() and any(x.requires_grad for x in tensors))
            or any(n.op == "get_attr" for n in gm.graph.nodes)):
        return None
    fakes = [_fakify(x, fake_mode) for x in example_inputs]
    with enable_python_dispatcher(), fake_mode:
        traced = make_fx(gm, decomposition_table=DECOMPOSITIONS,
                         record_module_stack=True)(*fakes)
    if any(writes_input(n) or (n.op == "get_attr" and not _fresh_constant(traced, n))
           for n in traced.graph.nodes):
        return None  # mutation or shared constants: AOTAutograd functionalizes them
    traced.graph.eliminate_dead_code()  # make_fx keeps unused outputs, as AOTAutograd does not
    traced.recompile()
    return traced


def _fresh_constant(traced: fx.GraphModule, node: fx.Node) -> bool:
    """A constant the traced code made itself (`torch.tensor([])` in Hugging Face's cache
    setup) and only ever copies before use, so no call can change what the next one sees."""
    from torch._subclasses.fake_tensor import FakeTensor

    value = getattr(traced, node.target, None)
    return (type(value) is torch.Tensor and not isinstance(value, FakeTensor)
            and all(u.target is aten.lift_fresh_copy.default for u in node.users))


def _fakify(x: Any, fake_mode: Any) -> Any:
    """The backend's fake value of one input, with the symbolic sizes Dynamo gave it (the way
    AOTAutograd fakifies Dynamo's inputs)."""
    from torch._subclasses.fake_tensor import FakeTensor

    if not isinstance(x, torch.Tensor) or (isinstance(x, FakeTensor)
                                           and x.fake_mode is fake_mode):
        return x
    if isinstance(x, FakeTensor):
        return fake_mode.from_tensor(x)
    tracing = torch._guards.TracingContext.try_get()
    context = tracing.tensor_to_context.get(x) if tracing is not None else None
    if context is None:
        return fake_mode.from_tensor(x, static_shapes=True)
    return fake_mode.from_tensor(x, symbolic_context=context, source=context.tensor_source,
                                 trace=False)


def unboxed(fn: Callable[[list], Any]) -> Callable[..., Any]:
    """Dynamo calls the backend's function with positional inputs; ours take one list."""
    def run(*args: Any) -> Any:
        return fn(list(args))
    return run


def boxed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a plain callable as taking AOTAutograd's boxed (single list) argument."""
    return make_boxed_func(fn)


def param_buffer_inputs(gm: fx.GraphModule) -> set[int]:
    """Positions of Dynamo graph inputs that are module parameters or buffers."""
    from torch._dynamo.source import is_from_unspecialized_param_buffer_source

    found = set()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        if source is not None and is_from_unspecialized_param_buffer_source(source):
            found.add(i)
    return found


@contextlib.contextmanager
def real_tensors() -> Iterator[None]:
    """Step out of the tracing fake mode, so constant folding computes on real weights."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.no_grad():
        yield


def dynamo_explain(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Dynamo's own account of graphs and graph breaks (with reasons) for one call."""
    import torch._dynamo

    return torch._dynamo.explain(fn)(*args, **kwargs)


def is_dynamo_restart(error: BaseException) -> bool:
    """Dynamo signals "trace this frame again" by raising through the backend; such an
    exception is control flow, never a compile failure to fall back from."""
    from torch._dynamo.exc import RestartAnalysis, SkipFrame

    return isinstance(error, (RestartAnalysis, SkipFrame))


def concrete_inputs(example_inputs: Sequence[Any]) -> list[Any] | None:
    """Dynamo's example inputs with each symbolic size replaced by the value it has in this
    call (its hint; reading it adds no guard), for running the graph once at compile time;
    None when a size has no hint."""
    concrete = []
    for x in example_inputs:
        if isinstance(x, torch.SymInt):
            if not x.node.has_hint():
                return None
            x = int(x.node.hint)
        concrete.append(x)
    return concrete


def has_symbolic_size(x: torch.Tensor) -> bool:
    """Does Dynamo treat any of this example tensor's sizes or strides as symbolic?"""
    from torch.fx.experimental.symbolic_shapes import free_symbols

    return bool(free_symbols(x))
