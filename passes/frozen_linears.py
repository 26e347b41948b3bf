"""The linear layers a quantize= pass may rewrite, and the per-layer record explain shows."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.fx as fx

from jitopt.passes.constants import constant_value
from jitopt.passes.graph_facts import tensor_meta
from jitopt.passes.prepack_linear_weights import ONEDNN_LINEARS, linear_operands

# The linears a quantize pass with kernels on both devices takes: float32 on CPU (the C++
# kernels'), and on CUDA every float dtype (the Triton kernels read x as it comes).
CPU_AND_CUDA_LINEARS = {"cpu": (torch.float32,),
                        "cuda": (torch.float32, torch.float16, torch.bfloat16)}


def frozen_linears(gm: fx.GraphModule, record_kept: bool = True,
                   accept: Mapping[str, tuple[torch.dtype, ...]] = ONEDNN_LINEARS
                   ) -> Iterator[tuple[fx.Node, fx.Node, torch.Tensor, fx.Node | None]]:
    """Each addmm/mm over a frozen weight with a 2-D x, both of a device and dtype `accept`
    lists (by default float32 on CPU), as (node, x, weight as [N, K] (nn.Linear's layout),
    bias node or None). A layer an accuracy budget keeps
    (gm.meta["quantize_keep"]) is recorded as kept, with the budget's reason, and skipped
    (unless `record_kept` is False: then the caller sees it and decides)."""
    for node in list(gm.graph.nodes):
        operands = linear_operands(node, accept)
        if operands is None or tensor_meta(operands[0]).dim() != 2:
            continue
        x, weight_node, bias_node = operands
        weight = constant_value(weight_node).t()
        kept = gm.meta.get("quantize_keep", {}).get(node.name)
        if kept is not None and record_kept:
            record_layer(gm, node, weight, "fp32 (kept)", reason=kept)
            continue
        yield node, x, weight, bias_node


def record_layer(gm: fx.GraphModule, node: fx.Node, weight: torch.Tensor, mode: str,
                 **fields: Any) -> None:
    """Add the layer to gm.meta["quantized_layers"] (what explain lists): its name, [N, K]
    shape, mode, and the mode's fields (weight_sqnr_db, or the reason it stayed fp32)."""
    gm.meta.setdefault("quantized_layers", []).append(
        {"layer": node.name, "shape": list(weight.shape), "mode": mode, **fields})
