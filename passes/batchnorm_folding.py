"""Shared arithmetic and matching for folding inference BatchNorm into the op before it."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from jitopt.passes.constants import constant_value, is_constant
from jitopt.passes.graph_facts import is_op

aten = torch.ops.aten


def batchnorm_users(producer: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """The inference BatchNorm that is `producer`'s only user, with its getitem[0] users, when
    all its parameters are frozen constants; else None."""
    if len(producer.users) != 1:
        return None
    bn = next(iter(producer.users))
    if not is_op(bn, aten._native_batch_norm_legit_no_training.default) or bn.args[0] is not producer:
        return None
    params = bn.args[1:5]  # weight, bias, running_mean, running_var
    if not all(p is None or is_constant(p) for p in params) or params[2] is None:
        return None
    outs = list(bn.users)
    if not all(is_op(u, operator.getitem) and u.args[1] == 0 for u in outs):
        return None  # the saved statistics are used: not a plain inference BatchNorm
    return bn, outs


def batchnorm_scale_shift(bn: fx.Node) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) with bn(y) == y * scale + shift, computed in float64."""
    weight, bias, mean, var = (None if a is None else constant_value(a).double()
                               for a in bn.args[1:5])
    eps = bn.args[6] if len(bn.args) > 6 else bn.kwargs["eps"]
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift
