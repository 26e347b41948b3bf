"""Linear layers over frozen weights to bfloat16 or float16 weights with float32 activations
and arithmetic (`quantize="bf16"` / `"fp16"`)."""

from __future__ import annotations

import torch
import torch.fx as fx

from jitopt.ops import pack_weight_blocks  # (importing jitopt.ops registers the op)
from jitopt.passes.constants import add_constant, constant_value
from jitopt.passes.graph_facts import tensor_meta
from jitopt.passes.prepack_linear_weights import linear_operands
from jitopt.passes.quantize_linear_int8 import sqnr_db

LINEAR_HALF_WEIGHT = torch.ops.jitopt.linear_half_weight.default
# Above this many rows of x a linear stays fp32 (oneDNN's packed fp32 GEMM). Measured here on
# GPT-2's shapes, the bfloat16-weight kernel against jitopt's fp32 linear: 1.5-2.2x at 1 row,
# 1.1-1.3x at 16-32, 1.02-1.08x at 64-128 (weights in cache; from memory, decoding, more).
# Beyond that it is unmeasured, and the kernel has no cache blocking over K that a large
# GEMM needs.
MAX_ROWS = 128


def store_linear_weights_bf16(gm: fx.GraphModule) -> int:
    """Rewrites x @ W (+ b) with a frozen float32 weight on CPU and at most MAX_ROWS rows of x
    (or a symbolic count) to `jitopt::linear_half_weight` with W rounded to bfloat16: x, the
    products, the sums and y stay float32, so the only error is the weight's rounding (8 bits
    of mantissa), reported per layer. Layers with more rows keep fp32, and say why."""
    return _store_half(gm, torch.bfloat16)


def store_linear_weights_fp16(gm: fx.GraphModule) -> int:
    """As store_linear_weights_bf16 with float16 weights: 11 bits of mantissa, but weights
    beyond float16's range (65504) would overflow, so such a layer keeps fp32."""
    return _store_half(gm, torch.float16)


def _store_half(gm: fx.GraphModule, dtype: torch.dtype) -> int:
    mode = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    rewrites = 0
    for node in list(gm.graph.nodes):
        operands = linear_operands(node)
        if operands is None or tensor_meta(operands[0]).dim() != 2:
            continue
        x, weight_node, bias_node = operands
        weight = constant_value(weight_node).t()  # [N, K]
        layer = {"layer": node.name, "shape": list(weight.shape)}
        kept = _kept_reason(gm, node, weight, dtype, tensor_meta(x).shape[0])
        if kept is not None:
            gm.meta.setdefault("quantized_layers", []).append(
                {**layer, "mode": "fp32 (kept)", "reason": kept})
            continue
        half = weight.to(dtype)
        packed = add_constant(gm, pack_weight_blocks(half), f"{node.name}_{mode}", node)
        with gm.graph.inserting_before(node):
            out = gm.graph.call_function(LINEAR_HALF_WEIGHT,
                                         (x, packed, weight.shape[0], bias_node))
        out.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        gm.meta.setdefault("quantized_layers", []).append(
            {**layer, "mode": mode, "weight_sqnr_db": round(sqnr_db(weight, half.float()), 2)})
        rewrites += 1
    return rewrites


def _kept_reason(gm: fx.GraphModule, node: fx.Node, weight: torch.Tensor, dtype: torch.dtype,
                 rows: object) -> str | None:
    """Why this layer stays fp32, or None to convert it."""
    kept = gm.meta.get("quantize_keep", {}).get(node.name)
    if kept is not None:
        return kept
    if isinstance(rows, int) and rows > MAX_ROWS:
        return (f"{rows} rows: compute-bound, where fp32's GEMM is the faster choice (half "
                f"weights are measured faster up to {MAX_ROWS} rows)")
    if dtype == torch.float16 and weight.abs().max() > torch.finfo(torch.float16).max:
        return "weights beyond float16's range"
    return None

