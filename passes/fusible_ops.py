"""Which ATen ops a fused kernel may contain, and the loop space each one needs.

This table is the contract between group_fusions (which groups these ops) and every kernel
renderer (which must lower all of them: tests/codegen/test_lowering.py checks). Ops not listed
here stay library calls: matmul and convolution on purpose (oneDNN/MKL beat generated loops),
the rest until someone lowers them.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

aten = torch.ops.aten

POINTWISE = frozenset({
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Tensor,
    aten.rsub.Scalar, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar,
    aten.div.Tensor_mode, aten.div.Scalar_mode, aten.maximum.default, aten.minimum.default,
    aten.atan2.default, aten.remainder.Tensor, aten.remainder.Scalar, aten.fmod.Tensor,
    aten.fmod.Scalar, aten.bitwise_and.Tensor, aten.bitwise_and.Scalar, aten.bitwise_or.Tensor,
    aten.bitwise_or.Scalar, aten.bitwise_xor.Tensor, aten.bitwise_xor.Scalar,
    aten.copysign.Tensor, aten.hypot.default, aten.pow.Tensor_Tensor, aten.pow.Tensor_Scalar,
    aten.pow.Scalar, aten.square.default, aten.relu.default, aten.silu.default,
    aten.gelu.default, aten.hardtanh.default, aten.clamp.default, aten.clamp_min.default,
    aten.clamp_max.default, aten.leaky_relu.default, aten.elu.default, aten.logical_not.default,
    aten.logical_and.default, aten.logical_or.default, aten.logical_xor.default,
    aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten._to_copy.default,
    aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default, aten.full.default,
    aten.scalar_tensor.default, aten.arange.start_step, aten.isnan.default, aten.isinf.default,
    aten.signbit.default,
    *(getattr(aten, name).default for name in (
        "neg", "abs", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt",
        "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "tanh", "asinh", "acosh",
        "atanh", "erf", "erfc", "sigmoid", "reciprocal", "floor", "ceil", "round", "trunc",
        "sign", "bitwise_not", "frac")),
    *(getattr(getattr(aten, name), overload) for name in ("eq", "ne", "lt", "le", "gt", "ge")
      for overload in ("Tensor", "Scalar")),
})

# Views are index remaps inside a kernel: they cost nothing, so they join whatever group
# consumes them, and only when all their users are in that group.
VIEWS = frozenset({
    aten.permute.default, aten.transpose.int, aten.t.default, aten.expand.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.slice.Tensor,
    aten.select.int,
})


def _dims_arg(position: int, default=None):
    def dims(node: fx.Node) -> list[int] | None:
        value = node.args[position] if len(node.args) > position else node.kwargs.get(
            "dim", default)
        if value is None:
            return None
        return [value] if isinstance(value, int) else list(value)
    return dims


def _layer_norm_dims(node: fx.Node) -> list[int]:
    return [-k for k in range(1, len(node.args[1]) + 1)]


# Reductions, with the dims each reduces (None: all of them).
REDUCTIONS = {
    aten.sum.dim_IntList: _dims_arg(1), aten.sum.default: lambda n: None,
    aten.mean.dim: _dims_arg(1), aten.mean.default: lambda n: None,
    aten.prod.dim_int: _dims_arg(1), aten.prod.default: lambda n: None,
    aten.amax.default: _dims_arg(1, ()), aten.amin.default: _dims_arg(1, ()),
    aten.argmax.default: _dims_arg(1), aten.argmin.default: _dims_arg(1),
    aten.var.correction: _dims_arg(1), aten.std.correction: _dims_arg(1),
    aten._softmax.default: _dims_arg(1), aten._log_softmax.default: _dims_arg(1),
    aten.native_layer_norm.default: _layer_norm_dims,
}

FUSIBLE = POINTWISE | VIEWS | frozenset(REDUCTIONS)

SUPPORTED_DTYPES = frozenset({
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool})


def row_reduction(node: fx.Node) -> tuple[tuple, object] | None:
    """(outer shape, row length) when `node` reduces exactly the last dim of its input (the
    only reduction a kernel computes: one row per outer point), else None."""
    dims = REDUCTIONS[node.target](node)
    source = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if not isinstance(source, torch.Tensor) or source.dim() == 0:
        return None
    ndim = source.dim()
    dims = list(range(ndim)) if dims is None or len(dims) == 0 else [d % ndim for d in dims]
    if sorted(dims) != [ndim - 1]:
        return None
    return tuple(source.shape[:-1]), source.shape[-1]


def is_multi_output(node: fx.Node) -> bool:
    return any(user.target is operator.getitem for user in node.users)
