"""Real pipeline inputs for pass tests: the frozen ATen graph jitopt would hand its passes."""

from __future__ import annotations

import torch
import torch.fx as fx

from jitopt import capture
from jitopt.compiler import _freeze_inputs


def frozen_aten_graph(module: torch.nn.Module, *inputs: torch.Tensor
                      ) -> tuple[fx.GraphModule, list]:
    """Capture `module(*inputs)` under no_grad as jitopt does (Dynamo -> AOTAutograd, weights
    frozen as get_attr constants). Returns the graph and the arguments to call it with."""
    captured = {}

    def record(gm, example_inputs):
        weights = {i: example_inputs[i] for i in capture.param_buffer_inputs(gm)}

        def inference(aten_gm, aot_inputs):
            _freeze_inputs(aten_gm, weights)
            aten_gm.recompile()  # the pipeline works on the graph; tests also run the module
            captured["gm"], captured["args"] = aten_gm, list(example_inputs)
            return capture.boxed(aten_gm)

        return capture.lower_to_aten(gm, example_inputs, inference=inference,
                                     forward=inference, backward=inference)

    with torch.no_grad():
        torch.compile(module, backend=record, fullgraph=True)(*inputs)
    return captured["gm"], captured["args"]


def call(gm: fx.GraphModule, args: list):
    with torch.no_grad():
        return gm(*args)


def ops(gm: fx.GraphModule) -> list[str]:
    """The graph's call_function targets, in order, by name ("aten.addmm.default")."""
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
