"""Linear layers over frozen weights to grouped 4-bit weights with float activations
(`quantize="int4-weight-only"`)."""

from __future__ import annotations

import torch
import torch.fx as fx

from jitopt.ops import pack_int4_weight, pack_weight_blocks  # (registers the op)
from jitopt.passes.constants import add_constant
from jitopt.passes.frozen_linears import CPU_AND_CUDA_LINEARS, frozen_linears, record_layer
from jitopt.passes.quantize_linear_int8 import sqnr_db
from jitopt.passes.weight_memo import per_weight

LINEAR_INT4_WEIGHT = torch.ops.jitopt.linear_int4_weight.default
INT4_LEVELS = 15  # codes 0..15
DEFAULT_GROUP_SIZE = 64
MIN_SCALE = 1e-12  # a constant group: all codes 0, the offset carries the value


def quantize_linear_int4_weight_only(gm: fx.GraphModule) -> int:
    """Rewrites x @ W (+ b) with a frozen [K, N] weight (float32 on CPU; any float dtype on
    CUDA) to `jitopt::linear_int4_weight`: each output channel's weights, in groups of
    gm.meta["quantize_group_size"] input channels (default 64), map to 16 evenly spaced
    levels from the group's min to its max (asymmetric, so a skewed group loses nothing at
    its ends); x stays as it is, the sums float32. Not exact: the weights' rounding,
    reported per layer as their SQNR. An eighth of fp32's weight bytes, for memory-bound
    decoding. Layers named in gm.meta["quantize_keep"] stay fp32."""
    group_size = gm.meta.get("quantize_group_size") or DEFAULT_GROUP_SIZE
    rewrites = 0
    for node, x, weight, bias_node in frozen_linears(gm, accept=CPU_AND_CUDA_LINEARS):
        *packed, sqnr = per_weight("int4-weight-only", weight,
                                   lambda: _prepared(weight, group_size), group_size)
        args = [x] + [add_constant(gm, value, f"{node.name}_int4{suffix}", node)
                      for value, suffix in zip(packed, ("", "_scale", "_offset"))]
        with gm.graph.inserting_before(node):
            out = gm.graph.call_function(LINEAR_INT4_WEIGHT,
                                         (*args, weight.shape[0], group_size, bias_node))
        out.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        record_layer(gm, node, weight, f"int4-weight-only (groups of {group_size})",
                     weight_sqnr_db=sqnr)
        rewrites += 1
    return rewrites


def _prepared(weight: torch.Tensor, group_size: int) -> tuple:
    """(codes, scales and offsets packed for the kernel, the weight's SQNR in dB)."""
    weight = weight.float()
    q, scale, offset = quantize_int4_grouped(weight, group_size)
    restored = dequantize_int4_grouped(q, scale, offset, group_size)
    return (pack_int4_weight(q), pack_weight_blocks(scale), pack_weight_blocks(offset),
            round(sqnr_db(weight, restored), 2))


def quantize_int4_grouped(weight: torch.Tensor, group_size: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float -> (codes [N, K] uint8 0..15, scale [N, groups], offset [N, groups]) with
    weight ~ codes * scale + offset per group of `group_size` input channels (the last group
    may be shorter)."""
    n, k = weight.shape
    grouped = _grouped(weight, group_size)  # [N, groups, group_size]
    if k % group_size:  # the padding must not widen the last group's range
        last = weight[:, (k // group_size) * group_size:]
        grouped[:, -1, last.shape[1]:] = last[:, :1]
    low, high = grouped.amin(-1), grouped.amax(-1)  # [N, groups]
    scale = ((high - low) / INT4_LEVELS).clamp_min(MIN_SCALE)
    codes = torch.round((grouped - low[..., None]) / scale[..., None]).clamp(0, INT4_LEVELS)
    codes = codes.to(torch.uint8).view(n, -1)[:, :k]
    return codes, scale.float(), low.float()


def dequantize_int4_grouped(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                            group_size: int) -> torch.Tensor:
    """codes * scale + offset per group: the [N, K] weight the kernel multiplies by."""
    n, k = codes.shape
    grouped = _grouped(codes, group_size).float()
    return (grouped * scale[..., None] + offset[..., None]).view(n, -1)[:, :k]


def _grouped(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, groups, group_size], zero-padded at the end when K is not a multiple."""
    k = t.shape[1]
    pad = -k % group_size
    padded = torch.nn.functional.pad(t, (0, pad)) if pad else t
    return padded.reshape(t.shape[0], -1, group_size)

