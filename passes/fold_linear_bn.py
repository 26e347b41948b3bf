import torch
import torch.fx as fx

from jitopt.passes.batchnorm_folding import batchnorm_scale_shift, batchnorm_users
from jitopt.passes.constants import add_constant, constant_value, is_constant
from jitopt.passes.graph_facts import is_op

aten = torch.ops.aten


def fold_linear_bn(gm: fx.GraphModule) -> int:
    """Folds an inference BatchNorm1d over the features of a 2-D linear layer (addmm or mm with a
    frozen weight) into that weight and bias; safe because both are affine per output feature."""
    folded = 0
    for mm in list(gm.graph.nodes):
        operands = _linear_operands(mm)
        match = batchnorm_users(mm) if operands else None
        if match is None:
            continue
        bn, outs = match
        bias_node, x, weight_node = operands
        weight = constant_value(weight_node)  # [in, out]: the transposed Linear weight
        scale, shift = batchnorm_scale_shift(bn)
        new_weight = (weight.double() * scale).to(weight.dtype)
        bias = constant_value(bias_node).double() if bias_node is not None else 0
        new_bias = (bias * scale + shift).to(weight.dtype)
        with gm.graph.inserting_before(mm):
            fused = gm.graph.call_function(aten.addmm.default, (
                add_constant(gm, new_bias, mm.name + "_bias", mm), x,
                add_constant(gm, new_weight, mm.name + "_weight", mm)))
        fused.meta["val"] = outs[0].meta.get("val", mm.meta.get("val"))
        for out in outs:
            out.replace_all_uses_with(fused)
            gm.graph.erase_node(out)
        gm.graph.erase_node(bn)
        gm.graph.erase_node(mm)
        folded += 1
    return folded


def _linear_operands(node: fx.Node):
    """(bias or None, input, weight) of a plain linear layer with frozen weight, else None."""
    if is_op(node, aten.mm.default):
        bias, (x, weight) = None, node.args
    elif is_op(node, aten.addmm.default) and not node.kwargs:
        bias, x, weight = node.args
        if not is_constant(bias) or constant_value(bias).dim() != 1:
            return None
    else:
        return None
    return (bias, x, weight) if is_constant(weight) else None
