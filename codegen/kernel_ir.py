"""The loop-level kernel IR: one fused group as an index space, loads, an expression DAG,
row reductions and stores. One IR, rendered to C++ (codegen/cpp_kernel.py) and Triton
(codegen/triton_kernel.py).

A kernel iterates over `ranges` (the outer loop variables i0, i1, ...) and, when it reduces,
over one more range `reduction_range` (the variable r) inside each outer point. Indices are
affine sympy expressions in those variables and in the kernel's size arguments (symbolic sizes
become arguments, so one compile serves every shape). Expressions are frozen dataclasses, so
equal subexpressions are equal values and renderers emit each once.

Dtypes are torch dtypes. An expression's dtype is the dtype PyTorch's type promotion gives the
op; renderers compute float16/bfloat16 values in float32 and round only at a store or an
explicit cast, as eager rounds at every op boundary that the fused group no longer has.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Union

import sympy
import torch

Size = Union[int, sympy.Expr]

# The loop variables, shared by every kernel and renderer.
REDUCTION_VAR = sympy.Symbol("r", integer=True, nonnegative=True)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a value is computed in: float32 for the half types, else its own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def outer_var(k: int) -> sympy.Symbol:
    return sympy.Symbol(f"i{k}", integer=True, nonnegative=True)


class Expr:
    """A value computed at one point of the index space."""

    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class Load(Expr):
    buffer: str
    index: sympy.Expr
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class Const(Expr):
    value: bool | int | float
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class Op(Expr):
    """A pointwise op; `op` is a name from POINTWISE_OPS, args already in the op's input dtype
    (see POINTWISE_OPS), except `cast`, whose one argument may have any dtype."""

    op: str
    args: tuple[Expr, ...]
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class IndexValue(Expr):
    """An index expression used as a value (arange, iota-style ops)."""

    index: sympy.Expr
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class Reduction:
    """A reduction over the kernel's reduction range of `value` (which depends on r).

    kind: sum | prod | max | min | argmax | argmin | welford. welford yields (mean, m2, count)
    in one pass; argmax/argmin yield the first index of the extreme value (NaN counts as the
    extreme, as in eager)."""

    kind: str
    value: Expr
    dtype: torch.dtype  # accumulator dtype (float32 for half inputs)


@dataclasses.dataclass(frozen=True)
class ReductionResult(Expr):
    """Output `output` of a finished reduction: usable by any expression after its loop."""

    reduction: Reduction
    output: int
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class Store:
    buffer: str
    index: sympy.Expr
    value: Expr


@dataclasses.dataclass(frozen=True)
class Buffer:
    name: str
    dtype: torch.dtype


@dataclasses.dataclass
class Kernel:
    name: str
    inputs: tuple[Buffer, ...]
    outputs: tuple[Buffer, ...]
    size_args: tuple[sympy.Symbol, ...]
    ranges: tuple[Size, ...]
    reduction_range: Size | None
    stores: tuple[Store, ...]

    @property
    def numel(self) -> Size:
        total = sympy.Mul(*self.ranges) if self.ranges else sympy.Integer(1)
        if self.reduction_range is not None:
            total = total * self.reduction_range
        return total


# Op name -> (arity, input dtype rule). "same": inputs are in the result dtype; "compare":
# inputs share a promoted dtype, result is bool; "bool": logical ops on bool inputs; "any":
# inputs keep their own dtypes (where's condition is bool, its branches the result dtype).
POINTWISE_OPS: dict[str, tuple[int, str]] = {
    **{name: (1, "same") for name in (
        "neg", "abs", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt",
        "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "tanh", "asinh", "acosh",
        "atanh", "erf", "erfc", "sigmoid", "reciprocal", "floor", "ceil", "round", "trunc",
        "sign", "bitwise_not", "square", "frac")},
    **{name: (2, "same") for name in (
        "add", "sub", "mul", "truediv", "floordiv", "remainder", "fmod", "pow", "maximum",
        "minimum", "atan2", "bitwise_and", "bitwise_or", "bitwise_xor", "copysign", "hypot")},
    **{name: (2, "compare") for name in ("eq", "ne", "lt", "le", "gt", "ge")},
    **{name: (1, "compare") for name in ("isnan", "isinf", "isfinite", "signbit")},
    "logical_not": (1, "bool"),
    **{name: (2, "bool") for name in ("logical_and", "logical_or", "logical_xor")},
    "where": (3, "any"),
    "cast": (1, "any"),
}

REDUCTION_KINDS = ("sum", "prod", "max", "min", "argmax", "argmin", "welford")


def reductions_in(expr: Expr) -> list[Reduction]:
    """The reductions `expr` reads, directly or through other reductions' values, each once."""
    found: dict[Reduction, None] = {}

    def visit(e: Expr) -> None:
        if isinstance(e, ReductionResult):
            if e.reduction not in found:
                visit(e.reduction.value)
                found[e.reduction] = None
        elif isinstance(e, Op):
            for a in e.args:
                visit(a)

    visit(expr)
    return list(found)


def reduction_levels(kernel: Kernel) -> dict[Reduction, int]:
    """Which loop over r computes each reduction: 1 + the deepest reduction its value reads
    (softmax: max in loop 1, the sum of exp(x - max) in loop 2)."""
    levels: dict[Reduction, int] = {}

    def level(red: Reduction) -> int:
        if red not in levels:
            inner = [level(r) for r in _direct_reductions(red.value)]
            levels[red] = 1 + max(inner, default=0)
        return levels[red]

    for store in kernel.stores:
        for red in reductions_in(store.value):
            level(red)
    return levels


def _direct_reductions(expr: Expr) -> list[Reduction]:
    if isinstance(expr, ReductionResult):
        return [expr.reduction]
    if isinstance(expr, Op):
        return [r for a in expr.args for r in _direct_reductions(a)]
    return []


def depends_on(expr: Expr, var: sympy.Symbol) -> bool:
    """Does `expr` vary with loop variable `var` (without looking inside finished reductions)?"""
    if isinstance(expr, (Load, IndexValue)):
        return var in expr.index.free_symbols
    if isinstance(expr, Op):
        return any(depends_on(a, var) for a in expr.args)
    return False


def provably_zero(expr: Any) -> bool:
    """Is `expr` (a size or index expression) zero for every value of its symbols? These are
    mostly integers and polynomials in Dynamo's size symbols, where expanding decides;
    sympy.simplify (milliseconds a call, a second per GPT-2 graph) only runs for what
    expansion leaves undecided."""
    if isinstance(expr, int):
        return expr == 0
    expr = sympy.expand(expr)
    if expr == 0 or expr.is_number or expr.is_polynomial():  # expanded: canonical
        return expr == 0
    return sympy.simplify(expr) == 0


def order_ranges_by_stride(kernel: Kernel) -> Kernel:
    """A pointwise kernel loops over its outer ranges in the first output's memory order
    (largest stride outermost), so a permuted layout such as channels-last walks memory
    contiguously (and collapse_ranges can then flatten it) instead of striding through it.
    Safe: every point of a pointwise kernel is computed and stored independently."""
    n = len(kernel.ranges)
    if kernel.reduction_range is not None or n < 2 or not kernel.stores:
        return kernel
    index = sympy.expand(kernel.stores[0].index)
    strides = [index.coeff(outer_var(k)) for k in range(n)]
    if not all(s.is_Integer for s in strides):
        return kernel  # symbolic strides: keep the logical order
    order = sorted(range(n), key=lambda k: -abs(int(strides[k])))  # stable: ties keep order
    if order == list(range(n)):
        return kernel
    renamed = {outer_var(old): outer_var(new) for new, old in enumerate(order)}
    kernel = _substitute(kernel, lambda ix: sympy.sympify(ix).xreplace(renamed))
    return dataclasses.replace(kernel, ranges=tuple(kernel.ranges[k] for k in order))


def collapse_ranges(kernel: Kernel) -> Kernel:
    """Merge adjacent outer ranges every index walks contiguously (i_k steps by exactly the
    extent of i_{k+1}), so contiguous same-shape tensors get one flat, vectorizable loop."""
    ranges = list(kernel.ranges)
    indices = [s.index for s in kernel.stores] + [e.index for e in _indexed(kernel)]
    k = len(ranges) - 2
    while k >= 0:
        a, b = outer_var(k), outer_var(k + 1)
        if all(provably_zero(ix.coeff(a) - ix.coeff(b) * ranges[k + 1])
               and ix.coeff(a).free_symbols.isdisjoint({a, b})
               for ix in map(sympy.expand, indices)):
            indices = [_merge(ix, k, len(ranges)) for ix in indices]
            kernel = _substitute(kernel, lambda ix: _merge(ix, k, len(ranges)))
            ranges[k:k + 2] = [ranges[k] * ranges[k + 1]]
        k -= 1
    return dataclasses.replace(kernel, ranges=tuple(ranges))


def _merge(index: sympy.Expr, k: int, ndim: int) -> sympy.Expr:
    """i_k, i_{k+1} -> one variable i_k counting both; later variables shift down by one."""
    index = sympy.expand(index)
    b = outer_var(k + 1)
    index = index.subs(outer_var(k), 0).subs(b, outer_var(k))  # coeff(i_k) == coeff(b) * size
    for j in range(k + 2, ndim):
        index = index.subs(outer_var(j), outer_var(j - 1))
    return index


def _indexed(kernel: Kernel) -> list[Load | IndexValue]:
    found: dict[Expr, None] = {}

    def visit(e: Expr) -> None:
        if isinstance(e, (Load, IndexValue)):
            found[e] = None
        elif isinstance(e, Op):
            for a in e.args:
                visit(a)
        elif isinstance(e, ReductionResult):
            visit(e.reduction.value)

    for s in kernel.stores:
        visit(s.value)
    return list(found)


def _substitute(kernel: Kernel, fn) -> Kernel:
    """Rewrite every index in the kernel with `fn`."""
    memo: dict[object, object] = {}

    def expr(e: Expr) -> Expr:
        if e in memo:
            return memo[e]
        if isinstance(e, (Load, IndexValue)):
            out = dataclasses.replace(e, index=fn(e.index))
        elif isinstance(e, Op):
            out = dataclasses.replace(e, args=tuple(expr(a) for a in e.args))
        elif isinstance(e, ReductionResult):
            out = dataclasses.replace(e, reduction=reduction(e.reduction))
        else:
            out = e
        memo[e] = out
        return out

    def reduction(red: Reduction) -> Reduction:
        if red not in memo:
            memo[red] = dataclasses.replace(red, value=expr(red.value))
        return memo[red]

    stores = tuple(Store(s.buffer, fn(s.index), expr(s.value)) for s in kernel.stores)
    return dataclasses.replace(kernel, stores=stores)


def index_source(expr: Size) -> str:
    """An index or size as C/Python source: sums and products of ints and size symbols, the
    common syntax of every renderer (sympy's C printer would emit pow() in double)."""
    expr = sympy.expand(sympy.sympify(expr))
    if expr.is_Integer:
        return str(int(expr))
    if expr.is_Symbol:
        return expr.name
    if expr.is_Add:
        terms = sorted(expr.args, key=sympy.default_sort_key)
        return "(" + " + ".join(index_source(t) for t in terms) + ")"
    if expr.is_Mul:
        return "*".join(index_source(f) for f in sorted(expr.args, key=sympy.default_sort_key))
    if expr.is_Pow and expr.exp.is_Integer and int(expr.exp) > 0:
        return "*".join([index_source(expr.base)] * int(expr.exp))
    raise NotImplementedError(f"index expression {expr} has no integer rendering")
