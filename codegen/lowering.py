"""Lower a fusion group (an FX GraphModule of ATen ops) to one kernel_ir.Kernel.

Each ATen op has a lowering in LOWERINGS, registered by explicit overload. A lowering turns
its inputs (TensorValues: a shape and a function from an index in that shape to an IR
expression) into its output TensorValue. Nothing is computed until the kernel's stores evaluate
the group's outputs at the kernel's loop variables, so views are index remaps and a chain of
pointwise ops becomes one expression.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import sympy
import torch
import torch.fx as fx

from jitopt.passes.fusible_ops import VIEWS

from jitopt.errors import Declined
from jitopt.codegen.kernel_ir import (
    REDUCTION_VAR, Buffer, Const, Expr, IndexValue, Kernel, Load, Op, Reduction, ReductionResult,
    Size, Store, collapse_ranges, compute_dtype, order_ranges_by_stride, outer_var,
    provably_zero)

aten = torch.ops.aten

Index = tuple[sympy.Expr, ...]


class Unsupported(Declined):
    """The group uses something the IR cannot express; it runs on ATen instead."""


@dataclasses.dataclass(frozen=True)
class TensorValue:
    shape: tuple[Size, ...]
    dtype: torch.dtype
    at: Callable[[Index], Expr]  # the element at an index into `shape`
    # For a kernel input and views of it: (buffer, the input's storage offset in the traced
    # metadata). Any view of it is then a plain strided load, whatever reshape it does.
    strided: tuple[str, Size] | None = None


LOWERINGS: dict[torch._ops.OpOverload, Callable[..., Any]] = {}


def lowers(*ops: torch._ops.OpOverload):
    def register(fn):
        for op in ops:
            if op in LOWERINGS:
                raise ValueError(f"{op} already has a lowering")
            LOWERINGS[op] = fn
        return fn
    return register


def sym(value: Any) -> Size:
    """An int or SymInt as an int or a sympy expression over the graph's size symbols."""
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        return int(expr) if expr.is_Integer else expr
    return int(value)


def meta(node: fx.Node) -> torch.Tensor:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise Unsupported(f"{node.format_node()} has no tensor metadata")
    return val


# --- building the kernel ------------------------------------------------------------------

def lower_group(gm: fx.GraphModule, name: str) -> tuple[Kernel, "KernelSignature"]:
    """The kernel computing every output of `gm`, and how to call it."""
    builder = _Builder(gm)
    return builder.build(name)


@dataclasses.dataclass(frozen=True)
class KernelSignature:
    """What the launcher needs: per input its expected layout, per output its allocation, and
    where each size argument comes from (an input's dim)."""

    inputs: tuple[tuple[tuple[Size, ...], tuple[Size, ...], torch.dtype], ...]  # shape, strides
    outputs: tuple[tuple[tuple[Size, ...], tuple[Size, ...], torch.dtype], ...]
    size_sources: tuple[tuple[sympy.Symbol, int, int], ...]  # symbol, input number, dim


class _Builder:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.values: dict[fx.Node, Any] = {}
        self.inputs: list[Buffer] = []
        self.input_layouts: list[tuple] = []
        self.space: tuple[tuple[Size, ...], Size | None] | None = None  # (outer, reduction)

    def build(self, name: str) -> tuple[Kernel, KernelSignature]:
        output = None
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.values[node] = self._input(node)
            elif node.op == "call_function":
                self.values[node] = self._call(node)
            elif node.op == "output":
                output = node
            else:
                raise Unsupported(f"cannot lower {node.format_node()}")
        outs = output.args[0] if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
        stores, layouts, buffers = [], [], []
        space = self._space([self.values[n] for n in outs])
        for k, node in enumerate(outs):
            value, m = self.values[node], meta(node)
            if not isinstance(value, TensorValue):
                raise Unsupported(f"output {node} is not a tensor")
            shape, strides = _layout(m)
            buffers.append(Buffer(f"out{k}", m.dtype))
            layouts.append((shape, strides, m.dtype))
            stores.append(self._store(f"out{k}", value, strides, space))
        kernel = Kernel(name, tuple(self.inputs), tuple(buffers), (), space[0], space[1],
                        tuple(stores))
        kernel = collapse_ranges(order_ranges_by_stride(kernel))
        sources = self._size_sources(kernel, layouts)
        kernel = dataclasses.replace(kernel, size_args=tuple(s for s, _, _ in sources))
        return kernel, KernelSignature(tuple(self.input_layouts), tuple(layouts), sources)

    def _input(self, node: fx.Node) -> Any:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return val  # a SymInt or scalar the group reads: used as a constant size
        buffer = Buffer(f"in{len(self.inputs)}", val.dtype)
        self.inputs.append(buffer)
        shape, strides = _layout(val)
        self.input_layouts.append((shape, strides, val.dtype))

        return _strided_value(buffer.name, val, sym(val.storage_offset()))

    def _call(self, node: fx.Node) -> Any:
        if node.target is operator.getitem:
            return self.values[node.args[0]][node.args[1]]
        source = self.values.get(node.args[0]) if node.args else None
        if node.target in VIEWS and isinstance(source, TensorValue) and source.strided:
            # The input's strides are checked at call time, so the traced view's are exact.
            return _strided_value(source.strided[0], meta(node), source.strided[1])
        lowering = LOWERINGS.get(node.target)
        if lowering is None:
            raise Unsupported(f"no kernel lowering for {node.target}")
        args = fx.node.map_arg(node.args, self.values.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, self.values.__getitem__)
        return lowering(_Ctx(node, self), *args, **kwargs)

    def reduction_space(self, outer: tuple[Size, ...], size: Size) -> None:
        if self.space is None:
            self.space = (outer, size)
        elif not _same_shape(self.space[0], outer) or not _same(self.space[1], size):
            raise Unsupported("reductions over different row shapes in one group")

    def _space(self, outputs: list[Any]) -> tuple[tuple[Size, ...], Size | None]:
        if self.space is not None:
            return self.space
        shapes = [v.shape for v in outputs if isinstance(v, TensorValue)]
        if not shapes:
            raise Unsupported("the group computes none of its outputs")
        if any(not _same_shape(s, shapes[0]) for s in shapes):
            raise Unsupported("pointwise outputs of different shapes in one group")
        return tuple(shapes[0]), None

    def _store(self, buffer: str, value: TensorValue, strides, space) -> Store:
        outer, rsize = space
        idx = _space_index(value.shape, outer, rsize)
        return Store(buffer, _linear(idx, strides), value.at(idx))

    def _size_sources(self, kernel: Kernel, out_layouts) -> tuple:
        needed = set()
        for size in (*kernel.ranges, kernel.reduction_range or 0):
            needed |= getattr(size, "free_symbols", set())
        for layout in (*self.input_layouts, *out_layouts):
            for size in (*layout[0], *layout[1]):
                needed |= getattr(size, "free_symbols", set())
        needed -= {REDUCTION_VAR} | {outer_var(k) for k in range(len(kernel.ranges) + 1)}
        sources = []
        for symbol in sorted(needed, key=str):
            found = [(i, d) for i, (shape, _, _) in enumerate(self.input_layouts)
                     for d, size in enumerate(shape) if size == symbol]
            if not found:
                raise Unsupported(f"size {symbol} is not the size of any kernel input")
            sources.append((symbol, *found[0]))
        return tuple(sources)


def _strided_value(buffer: str, val: torch.Tensor, base_offset: Size) -> TensorValue:
    """Elements of `buffer` laid out as the traced tensor `val` (a view of it or itself)."""
    shape, strides = _layout(val)
    offset = sympy.sympify(sym(val.storage_offset())) - base_offset

    def at(idx: Index) -> Expr:
        return Load(buffer, sympy.expand(offset + _linear(idx, strides)), val.dtype)

    return TensorValue(shape, val.dtype, at, strided=(buffer, base_offset))


def _space_index(shape: tuple[Size, ...], outer: tuple[Size, ...], rsize: Size | None) -> Index:
    """The loop variables at which a value of `shape` is evaluated in the kernel's space."""
    vars_ = [outer_var(k) for k in range(len(outer))]
    if rsize is None:
        return tuple(vars_)
    if len(shape) == len(outer) + 1:
        last = REDUCTION_VAR if not _same(shape[-1], 1) or _same(rsize, 1) else sympy.Integer(0)
        return (*vars_, last)
    if len(shape) == len(outer):
        return tuple(vars_)
    raise Unsupported(f"output of shape {shape} does not fit rows {outer} x {rsize}")


def _layout(t: torch.Tensor) -> tuple[tuple[Size, ...], tuple[Size, ...]]:
    return tuple(sym(s) for s in t.shape), tuple(sym(s) for s in t.stride())


def _linear(idx: Index, strides: Sequence[Size]) -> sympy.Expr:
    return sympy.expand(sum((sympy.sympify(i) * s for i, s in zip(idx, strides)),
                            sympy.Integer(0)))


def _same(a: Size, b: Size) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return provably_zero(sympy.sympify(a) - sympy.sympify(b))


def _same_shape(a: Sequence[Size], b: Sequence[Size]) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


class _Ctx:
    """What a lowering may ask: its node's output metadata, and the kernel's reduction space."""

    def __init__(self, node: fx.Node, builder: _Builder) -> None:
        self.node = node
        self.builder = builder

    @property
    def out(self) -> torch.Tensor:
        return meta(self.node)

    @property
    def shape(self) -> tuple[Size, ...]:
        return tuple(sym(s) for s in self.out.shape)


# --- pointwise ---------------------------------------------------------------------------

def broadcast(value: Any, shape: tuple[Size, ...], dtype: torch.dtype) -> Callable[[Index], Expr]:
    """`value` (a TensorValue or a Python scalar) read at an index of the broadcast `shape`,
    converted to `dtype`."""
    if not isinstance(value, TensorValue):
        const = Const(_scalar(value, dtype), dtype)
        return lambda idx: const
    lead = len(shape) - len(value.shape)
    ones = [_same(s, 1) and not _same(t, 1) for s, t in zip(value.shape, shape[lead:])]

    def at(idx: Index) -> Expr:
        own = tuple(sympy.Integer(0) if one else i for one, i in zip(ones, idx[lead:]))
        return cast(value.at(own), dtype)

    return at


def cast(expr: Expr, dtype: torch.dtype) -> Expr:
    if expr.dtype == dtype:
        return expr
    if isinstance(expr, Const):
        return Const(_scalar(expr.value, dtype), dtype)
    return Op("cast", (expr,), dtype)


def _scalar(value: Any, dtype: torch.dtype) -> bool | int | float:
    if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
        raise Unsupported("symbolic scalar operand")
    if dtype == torch.bool:
        return bool(value)
    if dtype.is_floating_point:
        return float(value)
    if dtype.is_complex:
        raise Unsupported("complex dtype")
    return int(value)


def pointwise(ctx: _Ctx, op: str, *operands: Any, dtype: torch.dtype | None = None) -> TensorValue:
    """An elementwise op on broadcast operands, computed in `dtype` (default: the node's)."""
    out = ctx.out
    compute = dtype or out.dtype
    if compute.is_complex or out.dtype.is_complex:
        raise Unsupported("complex dtype")
    shape = ctx.shape
    if op not in ("mul", "truediv", "floordiv"):  # eager's mul and div read it unrounded
        operands = tuple(_scalar_operand(v, compute) for v in operands)
    readers = [broadcast(v, shape, compute) for v in operands]
    result = out.dtype if dtype is None else dtype

    def at(idx: Index) -> Expr:
        return Op(op, tuple(r(idx) for r in readers), result)

    return TensorValue(shape, result, at)


def _scalar_operand(value: Any, dtype: torch.dtype) -> Any:
    """A Python scalar operand as eager's TensorIterator reads it: converted to the op's dtype,
    so a half type rounds it (bfloat16 x + 0.1 adds 0.10009765625, x == 0.1 is true for
    x = bfloat16(0.1)). Only mul and div keep the exact scalar (their CPU kernels read it in
    float32), and op parameters (alpha, slopes, clamp bounds) are not operands."""
    if dtype in (torch.float16, torch.bfloat16) and isinstance(value, (int, float)):
        return float(torch.tensor(value, dtype=dtype))
    return value


def _expr_fn(ctx: _Ctx, fn: Callable[..., Expr], *operands: Any,
             dtype: torch.dtype | None = None) -> TensorValue:
    """An elementwise function built from several IR ops (gelu, silu, ...)."""
    shape = ctx.shape
    compute = dtype or ctx.out.dtype
    readers = [broadcast(v, shape, compute) for v in operands]

    def at(idx: Index) -> Expr:
        return cast(fn(*(r(idx) for r in readers)), ctx.out.dtype)

    return TensorValue(shape, ctx.out.dtype, at)


def c(value: float | int | bool, like: Expr) -> Const:
    return Const(_scalar(value, like.dtype), like.dtype)


def _binary(name: str):
    return lambda ctx, a, b: pointwise(ctx, name, a, b)


for _name, _ops in {
    "add": (aten.add.Tensor,), "sub": (aten.sub.Tensor,),
    "mul": (aten.mul.Tensor, aten.mul.Scalar), "maximum": (aten.maximum.default,),
    "minimum": (aten.minimum.default,), "atan2": (aten.atan2.default,),
    "remainder": (aten.remainder.Tensor, aten.remainder.Scalar),
    "fmod": (aten.fmod.Tensor, aten.fmod.Scalar),
    "bitwise_and": (aten.bitwise_and.Tensor, aten.bitwise_and.Scalar),
    "bitwise_or": (aten.bitwise_or.Tensor, aten.bitwise_or.Scalar),
    "bitwise_xor": (aten.bitwise_xor.Tensor, aten.bitwise_xor.Scalar),
    "copysign": (aten.copysign.Tensor,), "hypot": (aten.hypot.default,),
    "pow": (aten.pow.Tensor_Tensor, aten.pow.Scalar),
}.items():
    lowers(*_ops)(_binary(_name))


@lowers(aten.pow.Tensor_Scalar)
def _pow_scalar(ctx, a, exponent):
    """x ** 0.5 and x ** -0.5 as eager computes them: float32, float64 and bfloat16 call sqrt
    and rsqrt (pow_tensor_scalar_kernel), which differ from pow at -0.0 and -inf; float16
    calls pow. powf(x, 0.5f) itself is no answer: GCC vectorizes it as sqrt, so the result
    at -inf would depend on the lane."""
    if not ctx.out.dtype.is_floating_point:
        return pointwise(ctx, "pow", a, exponent)
    if exponent in (2, 3, -1, -2):
        # Products, as eager's pow_tensor_scalar_optimized_kernel: exact where pow is, and a
        # vector multiply instead of a libm pow (GPT-2's GELU cubes its input).
        return _expr_fn(ctx, lambda x: _integer_power(x, int(exponent)), a)
    if exponent not in (0.5, -0.5):
        return pointwise(ctx, "pow", a, exponent)
    root = "sqrt" if exponent == 0.5 else "rsqrt"
    if ctx.out.dtype != torch.float16:
        return pointwise(ctx, root, a)

    def fn(x):  # pow's values where sqrt's differ: -0.0 acts as +0.0 (x + 0), -inf as +inf
        value = Op(root, (Op("add", (x, c(0.0, x)), x.dtype),), x.dtype)
        at_neg_inf = Op("eq", (x, c(-math.inf, x)), torch.bool)
        return Op("where", (at_neg_inf, c(math.inf if exponent > 0 else 0.0, x), value), x.dtype)
    return _expr_fn(ctx, fn, a)


def _integer_power(x: Expr, exponent: int) -> Expr:
    square = Op("mul", (x, x), x.dtype)
    power = {2: square, 3: Op("mul", (square, x), x.dtype), -1: x, -2: square}[exponent]
    return Op("reciprocal", (power,), x.dtype) if exponent < 0 else power


@lowers(aten.add.Scalar)
def _add_scalar(ctx, a, b, alpha=1):
    return _add(ctx, a, b, alpha, "add")


@lowers(aten.sub.Scalar)
def _sub_scalar(ctx, a, b, alpha=1):
    return _add(ctx, a, b, alpha, "sub")


def _add(ctx, a, b, alpha, op):
    if alpha != 1:
        return _expr_fn(ctx, lambda x, y: Op(op, (x, Op("mul", (y, c(alpha, y)), y.dtype)),
                                             x.dtype), a, b)
    return pointwise(ctx, op, a, b)


LOWERINGS[aten.add.Tensor] = lambda ctx, a, b, alpha=1: _add(ctx, a, b, alpha, "add")
LOWERINGS[aten.sub.Tensor] = lambda ctx, a, b, alpha=1: _add(ctx, a, b, alpha, "sub")


@lowers(aten.rsub.Scalar, aten.rsub.Tensor)
def _rsub(ctx, a, b, alpha=1):
    return _add(ctx, b, a, alpha, "sub")


@lowers(aten.div.Tensor, aten.div.Scalar)
def _div(ctx, a, b):
    return pointwise(ctx, "truediv", a, b)


@lowers(aten.div.Tensor_mode, aten.div.Scalar_mode)
def _div_mode(ctx, a, b, rounding_mode=None):
    if rounding_mode is None:
        return pointwise(ctx, "truediv", a, b)
    if rounding_mode == "floor":
        return pointwise(ctx, "floordiv", a, b)
    if ctx.out.dtype.is_floating_point:
        return _expr_fn(ctx, lambda x, y: Op("trunc", (Op("truediv", (x, y), x.dtype),),
                                             x.dtype), a, b)
    # Integers stay integers (through float64 they lost the bits past 2**53): floor division,
    # plus one where it rounded an inexact negative quotient down.
    def trunc_int(x, y):
        q = Op("floordiv", (x, y), x.dtype)
        inexact = Op("ne", (Op("fmod", (x, y), x.dtype), c(0, x)), torch.bool)
        negative = Op("ne", (Op("lt", (x, c(0, x)), torch.bool),
                             Op("lt", (y, c(0, y)), torch.bool)), torch.bool)
        up = Op("logical_and", (inexact, negative), torch.bool)
        return Op("where", (up, Op("add", (q, c(1, q)), q.dtype), q), q.dtype)
    return _expr_fn(ctx, trunc_int, a, b)


def _unary(name: str):
    return lambda ctx, a: pointwise(ctx, name, a)


for _name in ("neg", "abs", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt",
              "rsqrt", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "tanh",
              "asinh", "acosh", "atanh", "erf", "erfc", "sigmoid", "reciprocal", "floor", "ceil",
              "round", "trunc", "sign", "bitwise_not", "frac"):
    lowers(getattr(aten, _name).default)(_unary(_name))


@lowers(aten.square.default)
def _square(ctx, a):
    return _expr_fn(ctx, lambda x: Op("mul", (x, x), x.dtype), a)


@lowers(aten.relu.default)
def _relu(ctx, a):
    return _expr_fn(ctx, lambda x: Op("maximum", (x, c(0, x)), x.dtype), a)


@lowers(aten.silu.default)
def _silu(ctx, a):
    return _expr_fn(ctx, lambda x: Op("mul", (x, Op("sigmoid", (x,), x.dtype)), x.dtype), a,
                    dtype=compute_dtype(ctx.out.dtype))


@lowers(aten.gelu.default)
def _gelu(ctx, a, approximate="none"):
    def fn(x):
        f = x.dtype
        if approximate == "tanh":
            inner = Op("mul", (c(math.sqrt(2 / math.pi), x), Op("add", (x, Op("mul", (
                c(0.044715, x), Op("mul", (x, Op("mul", (x, x), f)), f)), f)), f)), f)
            return Op("mul", (Op("mul", (c(0.5, x), x), f), Op("add", (
                c(1, x), Op("tanh", (inner,), f)), f)), f)
        erf = Op("erf", (Op("mul", (x, c(1 / math.sqrt(2), x)), f),), f)
        return Op("mul", (Op("mul", (x, c(0.5, x)), f), Op("add", (c(1, x), erf), f)), f)
    return _expr_fn(ctx, fn, a, dtype=compute_dtype(ctx.out.dtype))


@lowers(aten.hardtanh.default)
def _hardtanh(ctx, a, lo=-1.0, hi=1.0):
    return _clamp(ctx, a, lo, hi)


@lowers(aten.clamp.default)
def _clamp(ctx, a, lo=None, hi=None):
    def fn(x):
        if lo is not None:
            x = Op("maximum", (x, c(lo, x)), x.dtype)
        if hi is not None:
            x = Op("minimum", (x, c(hi, x)), x.dtype)
        return x
    return _expr_fn(ctx, fn, a)


@lowers(aten.clamp_min.default)
def _clamp_min(ctx, a, lo):
    return _clamp(ctx, a, lo, None)


@lowers(aten.clamp_max.default)
def _clamp_max(ctx, a, hi):
    return _clamp(ctx, a, None, hi)


@lowers(aten.leaky_relu.default)
def _leaky_relu(ctx, a, slope=0.01):
    return _expr_fn(ctx, lambda x: Op("where", (Op("gt", (x, c(0, x)), torch.bool), x, Op(
        "mul", (x, c(slope, x)), x.dtype)), x.dtype), a)


@lowers(aten.elu.default)
def _elu(ctx, a, alpha=1.0, scale=1.0, input_scale=1.0):
    def fn(x):
        neg = Op("mul", (c(alpha, x), Op("expm1", (Op("mul", (x, c(input_scale, x)), x.dtype),),
                                          x.dtype)), x.dtype)
        picked = Op("where", (Op("gt", (x, c(0, x)), torch.bool), x, neg), x.dtype)
        return Op("mul", (picked, c(scale, x)), x.dtype)
    return _expr_fn(ctx, fn, a)


def _promoted(*operands: Any) -> torch.dtype:
    """PyTorch's result type for operands (TensorValues or Python scalars)."""
    probes = [torch.empty((1,) * len(v.shape) if v.shape else (), dtype=v.dtype)
              if isinstance(v, TensorValue) else v for v in operands]
    return torch.result_type(*probes) if len(probes) == 2 else probes[0].dtype


def _compare(name: str):
    return lambda ctx, a, b: _compare_values(ctx, name, a, b)


def _compare_values(ctx, name, a, b):
    """Comparisons compute in the operands' promoted dtype and yield bool."""
    compute = _promoted(a, b)
    shape = ctx.shape
    a, b = _scalar_operand(a, compute), _scalar_operand(b, compute)
    ra, rb = broadcast(a, shape, compute), broadcast(b, shape, compute)
    return TensorValue(shape, torch.bool, lambda idx: Op(name, (ra(idx), rb(idx)), torch.bool))


for _name in ("eq", "ne", "lt", "le", "gt", "ge"):
    lowers(getattr(aten, _name).Tensor, getattr(aten, _name).Scalar)(_compare(_name))


@lowers(aten.isnan.default, aten.isinf.default, aten.signbit.default)
def _predicate(ctx, a):
    name = ctx.node.target.overloadpacket.__name__
    return TensorValue(ctx.shape, torch.bool,
                       lambda idx: Op(name, (a.at(idx),), torch.bool))


@lowers(aten.logical_not.default)
def _logical_not(ctx, a):
    return pointwise(ctx, "logical_not", a, dtype=torch.bool)


for _name in ("logical_and", "logical_or", "logical_xor"):
    lowers(getattr(aten, _name).default)(
        lambda ctx, a, b, _n=_name: pointwise(ctx, _n, a, b, dtype=torch.bool))


@lowers(aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)
def _where(ctx, cond, a, b):
    shape, dtype = ctx.shape, ctx.out.dtype
    rc = broadcast(cond, shape, torch.bool)
    ra, rb = broadcast(a, shape, dtype), broadcast(b, shape, dtype)
    return TensorValue(shape, dtype, lambda idx: Op("where", (rc(idx), ra(idx), rb(idx)), dtype))


@lowers(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(ctx, a, mask, value):
    return _where(ctx, mask, value, a)


@lowers(aten._to_copy.default)
def _to_copy(ctx, a, dtype=None, layout=None, device=None, pin_memory=None,
             non_blocking=False, memory_format=None):
    if device is not None and torch.device(device) != ctx.out.device:
        raise Unsupported("device transfer")
    out = ctx.out.dtype
    return TensorValue(a.shape, out, lambda idx: cast(a.at(idx), out))


@lowers(aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default)
def _identity(ctx, a, **kwargs):
    return a


@lowers(aten.full.default)
def _full(ctx, size, value, **kwargs):
    dtype = ctx.out.dtype
    const = Const(_scalar(value, dtype), dtype)
    return TensorValue(ctx.shape, dtype, lambda idx: const)


@lowers(aten.scalar_tensor.default)
def _scalar_tensor(ctx, value, **kwargs):
    return _full(ctx, [], value)


@lowers(aten.arange.start_step)
def _arange(ctx, start, end, step=1, **kwargs):
    dtype = ctx.out.dtype
    if dtype.is_floating_point:
        raise Unsupported("floating-point arange")
    return TensorValue(ctx.shape, dtype,
                       lambda idx: IndexValue(sympy.Integer(start) + step * idx[0], dtype))


# --- views: index remaps ------------------------------------------------------------------

@lowers(aten.permute.default)
def _permute(ctx, a, dims):
    dims = [d % len(a.shape) for d in dims]
    inverse = [dims.index(k) for k in range(len(dims))]
    return TensorValue(ctx.shape, a.dtype, lambda idx: a.at(tuple(idx[j] for j in inverse)))


@lowers(aten.transpose.int)
def _transpose(ctx, a, d0, d1):
    order = list(range(len(a.shape)))
    if order:
        d0, d1 = d0 % len(order), d1 % len(order)
        order[d0], order[d1] = order[d1], order[d0]
    return _permute(ctx, a, order)


@lowers(aten.t.default)
def _t(ctx, a):
    return _permute(ctx, a, list(range(len(a.shape)))[::-1])


@lowers(aten.expand.default)
def _expand(ctx, a, size, implicit=False):
    shape, reader = ctx.shape, broadcast(a, ctx.shape, a.dtype)
    return TensorValue(shape, a.dtype, reader)


@lowers(aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
        aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _reshape(ctx, a, *args):
    """Only reshapes that insert or drop size-1 dims are index remaps; other reshapes of a
    computed value would need division, so the group ends before them."""
    shape = ctx.shape
    kept_src = [k for k, s in enumerate(a.shape) if not _same(s, 1)]
    kept_dst = [k for k, s in enumerate(shape) if not _same(s, 1)]
    if len(kept_src) != len(kept_dst) or not all(
            _same(a.shape[i], shape[j]) for i, j in zip(kept_src, kept_dst)):
        raise Unsupported(f"reshape {a.shape} -> {shape} inside a fused group")

    def at(idx: Index) -> Expr:
        own = [sympy.Integer(0)] * len(a.shape)
        for i, j in zip(kept_src, kept_dst):
            own[i] = idx[j]
        return a.at(tuple(own))

    return TensorValue(shape, a.dtype, at)


@lowers(aten.slice.Tensor)
def _slice(ctx, a, dim=0, start=None, end=None, step=1):
    dim %= len(a.shape)
    size = a.shape[dim]
    start = 0 if start is None else start
    if isinstance(start, int) and start < 0:
        start = start + size if isinstance(size, int) else None
    if start is None or not isinstance(start, int):
        raise Unsupported("slice with a symbolic or negative start")
    start = min(start, size) if isinstance(size, int) else start

    def at(idx: Index) -> Expr:
        own = list(idx)
        own[dim] = start + step * idx[dim]
        return a.at(tuple(own))

    return TensorValue(ctx.shape, a.dtype, at)


@lowers(aten.select.int)
def _select(ctx, a, dim, index):
    dim %= len(a.shape)
    if index < 0:
        if not isinstance(a.shape[dim], int):
            raise Unsupported("negative select on a symbolic dim")
        index += a.shape[dim]

    def at(idx: Index) -> Expr:
        return a.at((*idx[:dim], sympy.Integer(index), *idx[dim:]))

    return TensorValue(ctx.shape, a.dtype, at)


# --- reductions over the last dim ----------------------------------------------------------

def _row(ctx: _Ctx, a: TensorValue, dims: Sequence[int] | None) -> tuple[Size, ...]:
    """Check the reduction is over exactly the last dim of `a`, register the kernel's row space,
    and return the outer shape."""
    ndim = len(a.shape)
    dims = list(range(ndim)) if dims is None or len(dims) == 0 else [d % max(ndim, 1) for d in dims]
    if ndim == 0:
        raise Unsupported("reduction of a 0-d tensor")
    if sorted(dims) != [ndim - 1]:
        raise Unsupported(f"reduction over dims {dims} of a {ndim}-d tensor (only the last)")
    outer = tuple(a.shape[:-1])
    ctx.builder.reduction_space(outer, a.shape[-1])
    return outer


def _row_value(a: TensorValue, outer: tuple[Size, ...]) -> Expr:
    return a.at((*[outer_var(k) for k in range(len(outer))], REDUCTION_VAR))


def _row_result(ctx: _Ctx, outer, keepdim: bool, value: Callable[[], Expr],
                dtype: torch.dtype) -> TensorValue:
    """A per-row result: only readable at the kernel's current row."""
    expected = [outer_var(k) for k in range(len(outer))]

    def at(idx: Index) -> Expr:
        if list(idx[:len(outer)]) != expected:
            raise Unsupported("a row reduction read at another row")
        return cast(value(), dtype)

    shape = (*outer, 1) if keepdim else outer
    return TensorValue(shape, dtype, at)


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if dtype == torch.bool or not (dtype.is_floating_point or dtype.is_complex):
        return torch.int64
    return dtype


@lowers(aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default,
        aten.prod.dim_int, aten.prod.default)
def _sum(ctx, a, dims=None, keepdim=False, dtype=None):
    op = ctx.node.target.overloadpacket.__name__
    if isinstance(dims, int):
        dims = [dims]
    if ctx.node.target in (aten.sum.default, aten.mean.default, aten.prod.default):
        if len(a.shape) != 1:
            raise Unsupported("full reduction of a tensor with more than one dim")
        dims, keepdim = None, False
    outer = _row(ctx, a, dims)
    out = ctx.out.dtype
    acc = _accumulator(out)
    red = Reduction("prod" if op == "prod" else "sum",
                    cast(_row_value(a, outer), acc), acc)

    def value() -> Expr:
        total = ReductionResult(red, 0, acc)
        if op == "mean":
            return Op("truediv", (total, _count(a.shape[-1], acc)), acc)
        return total

    return _row_result(ctx, outer, keepdim, value, out)


@lowers(aten.amax.default, aten.amin.default)
def _amax(ctx, a, dims=(), keepdim=False):
    outer = _row(ctx, a, dims)
    kind = "max" if ctx.node.target is aten.amax.default else "min"
    acc = compute_dtype(a.dtype)
    red = Reduction(kind, cast(_row_value(a, outer), acc), acc)
    return _row_result(ctx, outer, keepdim, lambda: ReductionResult(red, 0, acc), ctx.out.dtype)


@lowers(aten.argmax.default, aten.argmin.default)
def _argmax(ctx, a, dim=None, keepdim=False):
    if dim is None:
        if len(a.shape) != 1:
            raise Unsupported("argmax over all dims of a multi-dim tensor")
        dim, keepdim = 0, False
    outer = _row(ctx, a, [dim])
    kind = "argmax" if ctx.node.target is aten.argmax.default else "argmin"
    acc = compute_dtype(a.dtype)
    red = Reduction(kind, cast(_row_value(a, outer), acc), acc)
    return _row_result(ctx, outer, keepdim, lambda: ReductionResult(red, 0, torch.int64),
                       torch.int64)


def _welford(ctx, a, dims) -> tuple[tuple, Reduction, torch.dtype]:
    outer = _row(ctx, a, dims)
    acc = compute_dtype(a.dtype)
    if not acc.is_floating_point:
        raise Unsupported("variance of an integer tensor")
    return outer, Reduction("welford", cast(_row_value(a, outer), acc), acc), acc


@lowers(aten.var.correction, aten.std.correction)
def _var(ctx, a, dims=None, *, correction=None, keepdim=False):
    outer, red, acc = _welford(ctx, a, dims)
    correction = 1 if correction is None else correction
    n = a.shape[-1]
    if not isinstance(n, int):
        raise Unsupported("variance over a symbolic row length")
    is_std = ctx.node.target is aten.std.correction

    def value() -> Expr:
        m2 = ReductionResult(red, 1, acc)
        # n <= correction gives inf or nan in eager too (0/0 or x/0).
        var = Op("truediv", (m2, Const(float(max(n - correction, 0)), acc)), acc)
        return Op("sqrt", (var,), acc) if is_std else var

    return _row_result(ctx, outer, keepdim, value, ctx.out.dtype)


@lowers(aten._softmax.default, aten._log_softmax.default)
def _softmax(ctx, a, dim, half_to_float=False):
    outer = _row(ctx, a, [dim])
    acc = compute_dtype(a.dtype)
    out = ctx.out.dtype
    x_at = lambda idx: cast(a.at(idx), acc)  # noqa: E731
    row_max = Reduction("max", x_at(_row_index(outer)), acc)
    mx = ReductionResult(row_max, 0, acc)
    shifted = lambda idx: Op("sub", (x_at(idx), mx), acc)  # noqa: E731
    total = Reduction("sum", Op("exp", (shifted(_row_index(outer)),), acc), acc)
    s = ReductionResult(total, 0, acc)
    log = ctx.node.target is aten._log_softmax.default

    def at(idx: Index) -> Expr:
        _check_row(idx, outer)
        if log:
            return cast(Op("sub", (shifted(idx), Op("log", (s,), acc)), acc), out)
        # Times the reciprocal, as eager's vectorized softmax (one division per row).
        inverse = Op("reciprocal", (s,), acc)
        return cast(Op("mul", (Op("exp", (shifted(idx),), acc), inverse), acc), out)

    return TensorValue(a.shape, out, at)


@lowers(aten.native_layer_norm.default)
def _layer_norm(ctx, a, normalized_shape, weight, bias, eps):
    if len(normalized_shape) != 1:
        raise Unsupported("layer norm over more than the last dim")
    outer, red, acc = _welford(ctx, a, [-1])
    n = a.shape[-1]
    mean = ReductionResult(red, 0, acc)
    variance = Op("truediv", (ReductionResult(red, 1, acc), _count(n, acc)), acc)
    rstd = Op("rsqrt", (Op("add", (variance, Const(float(eps), acc)), acc),), acc)
    out_dtype = ctx.node.meta["val"][0].dtype
    stat_dtype = ctx.node.meta["val"][1].dtype
    w = broadcast(weight, a.shape, acc) if weight is not None else None
    b = broadcast(bias, a.shape, acc) if bias is not None else None

    def at(idx: Index) -> Expr:
        _check_row(idx, outer)
        y = Op("mul", (Op("sub", (cast(a.at(idx), acc), mean), acc), rstd), acc)
        if w is not None:
            y = Op("mul", (y, w(idx)), acc)
        if b is not None:
            y = Op("add", (y, b(idx)), acc)
        return cast(y, out_dtype)

    # (output, mean, rstd); the statistics keep a size-1 last dim, as native_layer_norm's do.
    return (TensorValue(a.shape, out_dtype, at),
            _row_result(ctx, outer, True, lambda: mean, stat_dtype),
            _row_result(ctx, outer, True, lambda: rstd, stat_dtype))


def _count(n: Size, dtype: torch.dtype) -> Expr:
    """A row length as a value of `dtype` (a size argument when symbolic)."""
    if isinstance(n, int):
        return Const(float(n), dtype)
    return cast(IndexValue(sympy.sympify(n), torch.int64), dtype)


def _row_index(outer) -> Index:
    return (*[outer_var(k) for k in range(len(outer))], REDUCTION_VAR)


def _check_row(idx: Index, outer) -> None:
    if list(idx[:len(outer)]) != [outer_var(k) for k in range(len(outer))]:
        raise Unsupported("a row-normalized value read at another row")
