"""Linear layers over frozen weights to int8 weights with float activations
(`quantize="int8-weight-only"`)."""

from __future__ import annotations

import torch
import torch.fx as fx

from jitopt.ops import pack_weight_blocks  # (importing jitopt.ops registers the op)
from jitopt.passes.constants import add_constant
from jitopt.passes.frozen_linears import CPU_AND_CUDA_LINEARS, frozen_linears, record_layer
from jitopt.passes.quantize_linear_int8 import quantize_per_channel, weight_sqnr_db
from jitopt.passes.weight_memo import per_weight

LINEAR_INT8_WEIGHT = torch.ops.jitopt.linear_int8_weight.default


def quantize_linear_int8_weight_only(gm: fx.GraphModule) -> int:
    """Rewrites x @ W (+ b) with a frozen [K, N] weight (float32 on CPU; any float dtype on
    CUDA) to `jitopt::linear_int8_weight`: W rounded per output channel to int8 (scale =
    amax|row| / 127), x stays as it is, the sums in float32. Not exact: the error is the
    weight's rounding alone, reported per layer as its SQNR. Pays where reading the weight is
    the cost (decoding a token reads every weight for one row of x): a quarter of the bytes.
    Layers named in gm.meta["quantize_keep"] stay fp32."""
    rewrites = 0
    for node, x, weight, bias_node in frozen_linears(gm, accept=CPU_AND_CUDA_LINEARS):
        blocks, scale, sqnr = per_weight("int8-weight-only", weight, lambda: _prepared(weight))
        packed = add_constant(gm, blocks, node.name + "_int8", node)
        scale_node = add_constant(gm, scale, node.name + "_int8_scale", node)
        with gm.graph.inserting_before(node):
            out = gm.graph.call_function(LINEAR_INT8_WEIGHT,
                                         (x, packed, scale_node, bias_node))
        out.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        record_layer(gm, node, weight, "int8-weight-only", weight_sqnr_db=sqnr)
        rewrites += 1
    return rewrites


def _prepared(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(the int8 weight in the kernel's blocks, the scales, the weight's SQNR in dB)."""
    weight = weight.float()
    wq, scale = quantize_per_channel(weight)
    return pack_weight_blocks(wq), scale, round(weight_sqnr_db(weight, wq, scale), 2)

