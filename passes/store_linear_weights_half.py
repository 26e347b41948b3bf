"""Linear layers over frozen weights to bfloat16 compute on oneDNN, or to bfloat16 / float16
weights with float32 activations and arithmetic (`quantize="bf16"` / `"fp16"`)."""

from __future__ import annotations

import torch
import torch.fx as fx

from jitopt.ops import pack_weight_blocks  # (importing jitopt.ops registers the op)
from jitopt.passes.constants import add_constant, constant_value
from jitopt.passes.graph_facts import tensor_meta
from jitopt.passes.frozen_linears import frozen_linears, record_layer
from jitopt.passes.quantize_linear_int8 import seconds, sqnr_db

aten = torch.ops.aten
LINEAR_BLOCKED_WEIGHT = torch.ops.jitopt.linear_blocked_weight.default
ONEDNN_LINEAR = torch.ops.mkldnn._linear_pointwise.default
# Above this many rows of x a linear stays fp32 (oneDNN's packed fp32 GEMM). Measured here on
# GPT-2's shapes, the bfloat16-weight kernel against jitopt's fp32 linear: 1.5-2.2x at 1 row,
# 1.1-1.3x at 16-32, 1.02-1.08x at 64-128 (weights in cache; from memory, decoding, more).
# Beyond that it is unmeasured, and the kernel has no cache blocking over K that a large
# GEMM needs.
MAX_ROWS = 128
# At most this many rows (decoding), "bf16" too keeps x in float32 and reads bfloat16 weights
# in jitopt's kernel: reading the weights from memory is the cost there, and that kernel
# streams them faster than oneDNN's bf16 linear (GPT-2 generation 3.3x eager against 2.8x).
WEIGHT_ONLY_ROWS = 8
# The half-weight kernel is written for AVX-512 (codegen/cpp_quantized_linear.py); elsewhere
# the op would run its reference, which widens the whole weight on every call.
AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"


def store_linear_weights_bf16(gm: fx.GraphModule) -> int:
    """Rewrites x @ W (+ b) with a frozen float32 weight on CPU to a oneDNN bfloat16 linear
    (x and W rounded to bfloat16, products summed in float32, y back to float32) where that
    measured faster than oneDNN's fp32 linear at the example's row count (timed once per
    shape; on this CPU's AVX512-BF16 about 2x from 16 rows up); a layer where fp32 is faster
    keeps fp32 and says so. Not exact: x's and W's rounding to 8 bits of mantissa, reported
    per layer. Without bfloat16 support in oneDNN: bfloat16 weights with float32 activations
    and arithmetic (`jitopt::linear_blocked_weight`), as store_linear_weights_fp16 does."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return _store_half(gm, torch.bfloat16)
    rewrites = 0
    for node, x, weight, bias_node in frozen_linears(gm):
        rows = tensor_meta(x).shape[0]
        if isinstance(rows, int) and rows <= WEIGHT_ONLY_ROWS and AVX512:
            rewrites += _half_weights(gm, node, x, weight, bias_node, torch.bfloat16)
            continue
        if not bf16_linear_faster(rows if isinstance(rows, int) else 1, *weight.shape):
            record_layer(gm, node, weight, "fp32 (kept)", reason=f"{rows} rows: oneDNN's fp32 "
                         "linear measured faster than its bf16 one")
            continue
        half = weight.to(torch.bfloat16)
        packed = add_constant(gm, torch.ops.mkldnn._reorder_linear_weight(half, None),
                              f"{node.name}_bf16_packed", node)
        bias = None if bias_node is None else add_constant(
            gm, constant_value(bias_node).to(torch.bfloat16), f"{node.name}_bf16_bias", node)
        with gm.graph.inserting_before(node):
            out = _bf16_linear(gm.graph, x, packed, bias, node.meta["val"])
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        record_layer(gm, node, weight, "bf16 (oneDNN)",
                     weight_sqnr_db=round(sqnr_db(weight, half.float()), 2))
        rewrites += 1
    return rewrites


def _bf16_linear(graph: fx.Graph, x: fx.Node, packed: fx.Node, bias: fx.Node | None,
                 out_val: torch.Tensor) -> fx.Node:
    """float32 x -> bfloat16 -> oneDNN linear -> float32 (both conversions are pointwise: they
    fuse into the generated kernels beside them)."""
    x_half = graph.call_function(aten._to_copy.default, (x,), {"dtype": torch.bfloat16})
    x_half.meta["val"] = tensor_meta(x).to(torch.bfloat16)
    linear = graph.call_function(ONEDNN_LINEAR, (x_half, packed, bias, "none", [], ""))
    linear.meta["val"] = out_val.to(torch.bfloat16)
    out = graph.call_function(aten._to_copy.default, (linear,), {"dtype": torch.float32})
    out.meta["val"] = out_val
    return out


# (rows, N, K) -> is oneDNN's bf16 linear faster than its fp32 one? Measured once per process.
_BF16_FASTER: dict[tuple[int, int, int], bool] = {}


def bf16_linear_faster(rows: int, n: int, k: int) -> bool:
    """Time oneDNN's fp32 and bf16 linears (packed weights; the bf16 one with its conversions
    of x and y) on random data of this shape."""
    key = (rows, n, k)
    if key not in _BF16_FASTER:
        x, w = torch.randn(rows, k), torch.randn(n, k)
        fp32 = torch.ops.mkldnn._reorder_linear_weight(w, None)
        bf16 = torch.ops.mkldnn._reorder_linear_weight(w.to(torch.bfloat16), None)
        times = {
            "fp32": seconds(lambda: ONEDNN_LINEAR(x, fp32, None, "none", [], "")),
            "bf16": seconds(lambda: ONEDNN_LINEAR(x.to(torch.bfloat16), bf16, None, "none",
                                                   [], "").float())}
        _BF16_FASTER[key] = times["bf16"] < times["fp32"]
    return _BF16_FASTER[key]



def store_linear_weights_fp16(gm: fx.GraphModule) -> int:
    """As store_linear_weights_bf16 with float16 weights: 11 bits of mantissa, but weights
    beyond float16's range (65504) would overflow, so such a layer keeps fp32."""
    return _store_half(gm, torch.float16)


def _store_half(gm: fx.GraphModule, dtype: torch.dtype) -> int:
    rewrites = 0
    for node, x, weight, bias_node in frozen_linears(gm):
        kept = _kept_reason(weight, dtype, tensor_meta(x).shape[0])
        if kept is not None:
            record_layer(gm, node, weight, "fp32 (kept)", reason=kept)
            continue
        rewrites += _half_weights(gm, node, x, weight, bias_node, dtype)
    return rewrites


def _half_weights(gm: fx.GraphModule, node: fx.Node, x: fx.Node, weight: torch.Tensor,
                  bias_node: fx.Node | None, dtype: torch.dtype) -> int:
    """Replace the linear `node` by `jitopt::linear_blocked_weight` over `weight` in `dtype`."""
    mode = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    half = weight.to(dtype)
    packed = add_constant(gm, pack_weight_blocks(half), f"{node.name}_{mode}", node)
    with gm.graph.inserting_before(node):
        out = gm.graph.call_function(LINEAR_BLOCKED_WEIGHT, (x, packed, weight.shape[0], bias_node))
    out.meta["val"] = node.meta["val"]
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    record_layer(gm, node, weight, f"{mode} (weights only)",
                 weight_sqnr_db=round(sqnr_db(weight, half.float()), 2))
    return 1


def _kept_reason(weight: torch.Tensor, dtype: torch.dtype, rows: object) -> str | None:
    """Why this layer stays fp32, or None to convert it."""
    if isinstance(rows, int) and rows > MAX_ROWS:
        return (f"{rows} rows: compute-bound, where fp32's GEMM is the faster choice (half "
                f"weights are measured faster up to {MAX_ROWS} rows)")
    if dtype == torch.float16 and weight.abs().max() > torch.finfo(torch.float16).max:
        return "weights beyond float16's range"
    return None

