"""Embedding tables over frozen weights to int8 rows (with the int8 and int4 quantize modes)."""

from __future__ import annotations

import torch
import torch.fx as fx

from jitopt.passes.constants import add_constant, constant_value, is_constant
from jitopt.passes.frozen_linears import record_layer
from jitopt.passes.graph_facts import is_op, tensor_meta
from jitopt.passes.quantize_linear_int8 import quantize_per_channel, weight_sqnr_db
from jitopt.passes.refresh_meta import set_meta
from jitopt.passes.weight_memo import per_weight

aten = torch.ops.aten


def quantize_embedding_int8(gm: fx.GraphModule) -> int:
    """Rewrites aten.embedding over a frozen float32 [V, D] table on CPU to a lookup in an
    int8 copy (symmetric, one scale per row) times the looked-up rows' scales: a quarter of
    the table's bytes, and where the table is tied to a quantized output layer (GPT-2's
    wte and lm_head) the graph no longer holds any fp32 copy of it. Not exact: each row is
    rounded to 255 levels (explain shows the table's SQNR, which is the lookup's too)."""
    rewrites = 0
    for node in list(gm.graph.nodes):
        if not _quantizable(node):
            continue
        weight_node, indices = node.args[:2]
        table = constant_value(weight_node)
        wq, scale, sqnr = per_weight("int8 rows", table, lambda: _prepared(table))
        wq_node = add_constant(gm, wq, node.name + "_int8", node)
        scale_node = add_constant(gm, scale, node.name + "_int8_scale", node)
        graph = gm.graph
        with graph.inserting_before(node):
            rows = graph.call_function(aten.embedding.default, (wq_node, indices))
            as_float = graph.call_function(aten._to_copy.default, (rows,),
                                           {"dtype": torch.float32})
            scales = graph.call_function(aten.embedding.default, (scale_node, indices))
            out = graph.call_function(aten.mul.Tensor, (as_float, scales))  # [..., D] * [..., 1]
        # The lookup's own value is fake; its indices may be a constant (BERT's positions).
        set_meta([rows, as_float, scales, out], tensor_meta(node).fake_mode)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        record_layer(gm, node, table, "int8 (embedding rows)", kind="embedding",
                     weight_sqnr_db=sqnr)
        rewrites += 1
    return rewrites


def _prepared(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(int8 rows [V, D], their scales [V, 1], the table's SQNR in dB)."""
    wq, scale = quantize_per_channel(table)
    return wq, scale[:, None].contiguous(), round(weight_sqnr_db(table, wq, scale), 2)


def _quantizable(node: fx.Node) -> bool:
    """A plain lookup (no padding_idx gradient or max_norm business matters at inference)
    in a frozen 2-D float32 CPU table."""
    if not is_op(node, aten.embedding.default) or not is_constant(node.args[0]):
        return False
    table = constant_value(node.args[0])
    return table.dim() == 2 and table.dtype == torch.float32 and table.device.type == "cpu"
