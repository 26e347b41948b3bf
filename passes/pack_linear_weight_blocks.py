"""Linear layers with frozen float32 weights to the CPU target's weight-streaming GEMM."""

from __future__ import annotations

import torch
import torch.fx as fx

from jitopt.ops import pack_weight_blocks  # (importing jitopt.ops registers the op)
from jitopt.passes.constants import add_constant, constant_value
from jitopt.passes.graph_facts import tensor_meta
from jitopt.passes.prepack_linear_weights import (
    already_packed, linear_operands, onednn_layout, packed_once)

LINEAR_BLOCKED_WEIGHT = torch.ops.jitopt.linear_blocked_weight.default
# Up to this many rows of x (or any number, when the rows are symbolic), the kernel measured
# faster than oneDNN with GPT-2's and the MLP benchmark's weights coming from memory: 1.2x at
# 1 and 16-64 rows, 1.02-1.05x at 128, 1.3x on the MLP's 32. At 256 rows it measured 0.96x,
# at 1024 1.0x. A weight an earlier graph packed one way (a prefill graph, then decode steps
# over the same weights) is packed that way again: one copy in memory.
MAX_ROWS = 128


def pack_linear_weight_blocks(gm: fx.GraphModule) -> int:
    """Rewrites addmm/mm with a frozen [K, N] float32 weight on an AVX-512 CPU, at most
    MAX_ROWS rows of x (or symbolic rows), to jitopt::linear_blocked_weight over the weight
    packed once into blocks of 64 output channels. Why: the CPU target's kernel for it
    (codegen/cpp_float_linear.py) prefetches the weight while it computes, where oneDNN's
    GEMM loses 15-40% when the weight comes from memory, as a model's weights do on every
    call. Safe: the same float32 products and float32 sums (in chunks of 512 terms, added
    chunk by chunk, the bias with the first), from the frozen values."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return 0  # the kernel is written for AVX-512; the reference alone would be slower
    rewrites = 0
    for node in list(gm.graph.nodes):
        operands = linear_operands(node)
        if operands is None:
            continue
        x, weight_node, bias_node = operands
        weight = constant_value(weight_node)  # [K, N]
        if not _takes(weight.t(), tensor_meta(x).shape[0]):
            continue
        packed = add_constant(gm, packed_once(weight.t(), pack_weight_blocks),
                              node.name + "_blocks", node)
        with gm.graph.inserting_before(node):
            linear = gm.graph.call_function(LINEAR_BLOCKED_WEIGHT,
                                            (x, packed, weight.shape[1], bias_node))
        linear.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(linear)
        gm.graph.erase_node(node)
        rewrites += 1
    return rewrites


def _takes(weight: torch.Tensor, rows: object) -> bool:
    """Blocks for this [N, K] weight at `rows` rows of x: where the kernel is the faster,
    unless an earlier graph packed the weight for oneDNN; or where one packed it in blocks."""
    if already_packed(weight, pack_weight_blocks):
        return True
    if already_packed(weight, onednn_layout):
        return False
    return not isinstance(rows, int) or rows <= MAX_ROWS
