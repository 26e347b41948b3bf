import torch
import torch.fx as fx

from jitopt.passes.batchnorm_folding import batchnorm_scale_shift, batchnorm_users
from jitopt.passes.constants import add_constant, constant_value, is_constant
from jitopt.passes.graph_facts import is_op

aten = torch.ops.aten


def fold_conv_bn(gm: fx.GraphModule) -> int:
    """Folds an inference BatchNorm into the frozen weight and bias of the convolution feeding it;
    safe because BN in eval mode is a per-output-channel affine map and the conv is linear."""
    folded = 0
    for conv in list(gm.graph.nodes):
        if not is_op(conv, aten.convolution.default) or not _foldable_conv(conv):
            continue
        match = batchnorm_users(conv)
        if match is None:
            continue
        bn, outs = match
        weight = constant_value(conv.args[1])
        bias = constant_value(conv.args[2]) if conv.args[2] is not None else None
        scale, shift = batchnorm_scale_shift(bn)
        new_weight = weight.double() * scale.reshape(-1, *[1] * (weight.dim() - 1))
        new_bias = shift if bias is None else bias.double() * scale + shift
        args = list(conv.args)
        args[1] = add_constant(gm, new_weight.to(weight.dtype), conv.name + "_weight", conv)
        args[2] = add_constant(gm, new_bias.to(weight.dtype), conv.name + "_bias", conv)
        conv.args = tuple(args)
        for out in outs:
            out.replace_all_uses_with(conv)
            gm.graph.erase_node(out)
        gm.graph.erase_node(bn)
        folded += 1
    return folded


def _foldable_conv(conv: fx.Node) -> bool:
    transposed = conv.args[6]
    weight, bias = conv.args[1], conv.args[2]
    return not transposed and is_constant(weight) and (bias is None or is_constant(bias))
