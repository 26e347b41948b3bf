"""Batched matmuls with a frozen operand into one frozen-weight matmul per batch entry."""

from __future__ import annotations

import torch
import torch.fx as fx

from jitopt.passes.constants import add_constant, constant_value, is_constant
from jitopt.passes.graph_facts import is_op, tensor_meta
from jitopt.passes.refresh_meta import set_meta

aten = torch.ops.aten
# More batch entries than this stay one bmm: a graph of hundreds of small matmuls would cost
# more in calls than quantizing saves (per-head weights and stacked experts are a few to 64).
MAX_ENTRIES = 64


def split_constant_bmm(gm: fx.GraphModule) -> int:
    """Rewrites bmm(x, W) with a frozen [B, K, N] W (B <= 64; `torch.bmm`, or a `matmul` or
    `einsum` over per-head or per-expert weights, once folding made W a constant) to
    stack([mm(x[b], W[b]) for b]): the same products, each now an `mm` over a frozen [K, N]
    weight that the quantize passes after it take as a linear layer. Runs only when
    quantizing (one bmm call is faster than B small ones in float)."""
    rewrites = 0
    for node in list(gm.graph.nodes):
        if not is_op(node, aten.bmm.default) or not is_constant(node.args[1]):
            continue
        x, weight_node = node.args
        weight = constant_value(weight_node)
        if not 1 <= weight.shape[0] <= MAX_ENTRIES or not weight.dtype.is_floating_point:
            continue
        steps: list[fx.Node] = []
        products = []
        for b in range(weight.shape[0]):
            entry = add_constant(gm, weight[b], f"{node.name}_{b}", node)
            with gm.graph.inserting_before(node):
                row = gm.graph.call_function(aten.select.int, (x, 0, b))
                products.append(gm.graph.call_function(aten.mm.default, (row, entry)))
            steps += [row, products[-1]]
        with gm.graph.inserting_before(node):
            out = gm.graph.call_function(aten.stack.default, (products, 0))
        set_meta(steps + [out], tensor_meta(x).fake_mode)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        rewrites += 1
    return rewrites
