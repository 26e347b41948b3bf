"""The tanh approximation of GELU written out op by op, to one `gelu(approximate="tanh")`."""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch.fx.subgraph_rewriter import replace_pattern_with_filters

aten = torch.ops.aten
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # as Hugging Face's NewGELUActivation writes it


def _written_out(x):
    # 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x ** 3))), in the ATen ops that
    # Hugging Face's gelu_new (GPT-2, GPT-J, ...) traces to.
    cubic = aten.mul.Tensor(aten.pow.Tensor_Scalar(x, 3.0), 0.044715)
    inner = aten.mul.Tensor(aten.add.Tensor(x, cubic), SQRT_2_OVER_PI)
    return aten.mul.Tensor(aten.mul.Tensor(x, 0.5), aten.add.Tensor(aten.tanh.default(inner), 1.0))


def _one_op(x):
    return aten.gelu.default(x, approximate="tanh")


_PATTERNS: dict[str, fx.GraphModule] = {}


def _traced(fn) -> fx.GraphModule:
    if fn.__name__ not in _PATTERNS:
        _PATTERNS[fn.__name__] = fx.symbolic_trace(fn)
    return _PATTERNS[fn.__name__]


def _on_floats(match, original_graph: fx.Graph, pattern_graph: fx.Graph) -> bool:
    (x,) = match.placeholder_nodes
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


def rewrite_gelu_tanh(gm: fx.GraphModule) -> int:
    """Rewrites 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))) to one tanh-GELU, which
    a oneDNN linear takes as its post-op and fusion sees as one op. Safe: ATen's tanh-GELU is
    this formula with these constants; only floating point rounding order differs, and the
    intermediates must have no other user (the matcher checks that)."""
    if not any(n.target is aten.tanh.default for n in gm.graph.nodes):
        return 0  # the matcher costs tens of milliseconds on a large graph
    replaced = replace_pattern_with_filters(gm, _traced(_written_out), _traced(_one_op),
                                            match_filters=[_on_floats], ignore_literals=False)
    for match in replaced:
        # match.anchor is the pattern's output node; nodes_map takes it to the graph's.
        val = match.nodes_map[match.anchor].meta.get("val")
        for node in match.replacements:
            if node.target is aten.gelu.default:
                node.meta["val"] = val
    return len(replaced)
