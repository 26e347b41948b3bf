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
