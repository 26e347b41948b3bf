"""Render a kernel_ir.Kernel as a Triton kernel: the GPU rendering of the IR that
codegen/cpp_kernel.py renders for the CPU, with the same op semantics.

Shape of the code:
  * pointwise kernels: a 1-D grid over the flattened outer space, XBLOCK points per program,
    delinearized into i0, i1, ... with // and %; every load and store is masked;
  * reduction kernels: each program owns XBLOCK rows (a [XBLOCK, 1] column of row indices) and
    walks r in RBLOCK chunks, once per reduction level (softmax: max, then sum of exp), keeping
    an [XBLOCK, RBLOCK] tile of per-lane accumulators that one tl.reduce folds at the end of the
    loop; then row-scalar stores, then one more loop for the stores that depend on r.
Half types are loaded, upcast to float32, computed in float32 and rounded at a store or cast.

Every op is written with functions that exist both in compiled Triton and in the interpreter
(TRITON_INTERPRET=1), so one source is tested on CPU and runs on the GPU. libdevice calls do not
run in the interpreter, so functions it alone provides are either composed from simpler ones
(expm1, log1p, tanh, hyperbolic functions, round, hypot) or listed in UNSUPPORTED_OPS: a kernel
using those raises Declined while rendering and its group stays on ATen. Kernels call only
builtins and the helpers defined here, never triton.language's own @jit functions (tl.sum,
tl.zeros, ...): those are compiled or interpreted according to TRITON_INTERPRET when triton is
first imported, while generated modules follow it when they are imported.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import sympy
import torch

from jitopt.codegen.kernel_ir import (
    REDUCTION_VAR, Const, Expr, IndexValue, Kernel, Load, Op, Reduction, ReductionResult,
    Store, depends_on, index_source, outer_var, reduction_levels)
from jitopt.errors import Declined

TL_TYPES = {
    torch.float32: "tl.float32", torch.float64: "tl.float64", torch.float16: "tl.float16",
    torch.bfloat16: "tl.bfloat16", torch.int64: "tl.int64", torch.int32: "tl.int32",
    torch.int16: "tl.int16", torch.int8: "tl.int8", torch.uint8: "tl.uint8", torch.bool: "tl.int1",
}

# Ops with no rendering that is both accurate and runnable by the interpreter (only libdevice
# has them, or composing them from exp/log loses every digit somewhere in their domain).
UNSUPPORTED_OPS = {
    "asin": "only libdevice has asin",
    "acos": "only libdevice has acos",
    "atan": "only libdevice has atan",
    "atan2": "only libdevice has atan2",
    "erfc": "1 - erf(x) cancels for x > 3; only libdevice has erfc",
}

# Integer exponents up to this size are unrolled into multiplications (as eager's pow does for
# small exponents); anything else would need libdevice's pow.
MAX_UNROLLED_EXPONENT = 64

# The index an arg-reduction lane holds before it has seen a value (see _argmax_take).
EMPTY_LANE = 2**63 - 1

PRELUDE = '''
import triton
import triton.language as tl


@triton.jit
def _max_nan(a, b):
    # NaN-propagating maximum, as torch.maximum and amax (tl.maximum drops NaN on the GPU)
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def _min_nan(a, b):
    return tl.where((a < b) | (a != a), a, b)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _mul(a, b):
    return a * b


@triton.jit
def _argmax_take(best, best_idx, v):
    # does v replace the lane's best? An empty lane takes anything, NaN wins, and ties keep
    # the earlier (lower) index
    return (v > best) | ((v != v) & (best == best)) | (best_idx == 9223372036854775807)


@triton.jit
def _argmin_take(best, best_idx, v):
    return (v < best) | ((v != v) & (best == best)) | (best_idx == 9223372036854775807)


@triton.jit
def _argmax_combine(va, ia, vb, ib):
    # merging lanes: NaN first, then the larger value, ties (and NaN against NaN) by index
    a_nan = va != va
    b_nan = vb != vb
    b_wins = (vb > va) | ((vb == va) & (ib < ia))
    b_wins = tl.where(a_nan | b_nan, b_nan & (~a_nan | (ib < ia)), b_wins)
    return tl.where(b_wins, vb, va), tl.where(b_wins, ib, ia)


@triton.jit
def _argmin_combine(va, ia, vb, ib):
    a_nan = va != va
    b_nan = vb != vb
    b_wins = (vb < va) | ((vb == va) & (ib < ia))
    b_wins = tl.where(a_nan | b_nan, b_nan & (~a_nan | (ib < ia)), b_wins)
    return tl.where(b_wins, vb, va), tl.where(b_wins, ib, ia)


@triton.jit
def _welford_step(mean, m2, n, x, mask):
    # one Welford update per lane; masked lanes keep their state
    n_new = tl.where(mask, n + 1.0, n)
    delta = x - mean
    mean_new = tl.where(mask, mean + delta / tl.maximum(n_new, 1.0), mean)
    m2_new = tl.where(mask, m2 + delta * (x - mean_new), m2)
    return mean_new, m2_new, n_new


@triton.jit
def _welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    # Chan et al.'s pairwise merge of two (mean, m2, count) states; empty states merge cleanly
    n = n_a + n_b
    w_b = tl.where(n == 0.0, 0.0, n_b / tl.maximum(n, 1.0))
    delta = mean_b - mean_a
    return mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b, n


@triton.jit
def _round_to_bf16(x):
    # round a float32 to bfloat16 precision, to nearest even (NaN stays NaN); the interpreter's
    # own float32 -> bfloat16 conversion truncates, so the rounding is done here in bits and
    # the conversion that follows is exact on every backend
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def _signbit(x):
    if x.dtype == tl.float64:
        return x.to(tl.int64, bitcast=True) < 0
    else:
        return x.to(tl.int32, bitcast=True) < 0


@triton.jit
def _sqrt(x):
    # correctly rounded (tl.sqrt is the fast approximation for float32)
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _trunc(x):
    return tl.where(x < 0, tl.ceil(x), tl.floor(x))


@triton.jit
def _round_half_even(x):
    # torch.round: halves go to the even neighbour; x - floor(x) is exact, so no x + 0.5
    # rounding trap; the sign of a zero result follows x
    r = tl.floor(x)
    diff = x - r
    r_is_odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    up = (diff > 0.5) | ((diff == 0.5) & r_is_odd)
    r = tl.where(up, r + 1.0, r)
    return tl.where(r == 0.0, x * 0.0, r)


@triton.jit
def _sign(x):
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


@triton.jit
def _expm1(x):
    # a Taylor polynomial near 0 (where exp(x) - 1 cancels), exp(x) - 1 elsewhere; the
    # polynomial does not depend on how accurate the backend's exp and log are near 1
    if x.dtype == tl.float64:
        p = 1.0 / 17.0
        for k in tl.static_range(16, 1, -1):
            p = 1.0 + x * p / k
    else:
        p = 1.0 / 10.0
        for k in tl.static_range(9, 1, -1):
            p = 1.0 + x * p / k
    return tl.where(tl.abs(x) < 0.5, x * p, tl.exp(x) - 1.0)


@triton.jit
def _log1p(x):
    # log1p(x) = 2 atanh(s), s = x / (2 + x): an odd series in s near 0, log(1 + x) elsewhere
    s = x / (2.0 + x)
    s2 = s * s
    if x.dtype == tl.float64:
        p = 1.0 / 21.0
        for k in tl.static_range(19, 0, -2):
            p = 1.0 / k + s2 * p
    else:
        p = 1.0 / 11.0
        for k in tl.static_range(9, 0, -2):
            p = 1.0 / k + s2 * p
    return tl.where(tl.abs(x) < 0.25, 2.0 * s * p, tl.log(1.0 + x))


@triton.jit
def _tanh(x):
    t = _expm1(2.0 * tl.abs(x))
    r = tl.where(tl.abs(x) > 20.0, 1.0, t / (t + 2.0))
    return tl.where(_signbit(x), -r, r)


@triton.jit
def _sinh(x):
    a = tl.abs(x)
    t = _expm1(a)
    half_e = 0.5 * tl.exp(0.5 * a)
    r = tl.where(a > 20.0, half_e * tl.exp(0.5 * a), 0.5 * (t + t / (t + 1.0)))
    return tl.where(_signbit(x), -r, r)


@triton.jit
def _cosh(x):
    a = tl.abs(x)
    e = tl.exp(a)
    half_e = 0.5 * tl.exp(0.5 * a)
    return tl.where(a > 20.0, half_e * tl.exp(0.5 * a), 0.5 * (e + 1.0 / e))


@triton.jit
def _asinh(x):
    a = tl.abs(x)
    big = tl.log(a) + 0.6931471805599453
    r = tl.where(a > 268435456.0, big, _log1p(a + a * a / (1.0 + _sqrt(1.0 + a * a))))
    return tl.where(_signbit(x), -r, r)


@triton.jit
def _acosh(x):
    t = x - 1.0
    big = tl.log(x) + 0.6931471805599453
    return tl.where(x > 268435456.0, big, _log1p(t + _sqrt(2.0 * t + t * t)))


@triton.jit
def _atanh(x):
    a = tl.abs(x)
    r = 0.5 * _log1p(2.0 * a / (1.0 - a))
    return tl.where(_signbit(x), -r, r)


@triton.jit
def _hypot(a, b):
    # scaled so that neither square overflows nor underflows; inf beats NaN, as in C
    x = tl.abs(a)
    y = tl.abs(b)
    big = tl.where(x > y, x, y)
    small = tl.where(x > y, y, x)
    ratio = small / tl.where(big == 0.0, 1.0, big)
    r = big * _sqrt(1.0 + ratio * ratio)
    r = tl.where((x != x) | (y != y), x + y, r)
    return tl.where((x == float("inf")) | (y == float("inf")), float("inf"), r)


@triton.jit
def _floordiv_float(a, b):
    # eager's div_floor_floating: exact where floor(a / b) would round first
    mod = a % b
    div = (a - mod) / b
    div = tl.where((mod != 0.0) & ((b < 0.0) != (mod < 0.0)), div - 1.0, div)
    q = tl.floor(div)
    q = tl.where(div - q > 0.5, q + 1.0, q)
    q = tl.where(div == 0.0, (a / b) * 0.0, q)
    return tl.where(b == 0.0, a / b, q)


@triton.jit
def _remainder_float(a, b):
    mod = a % b
    return tl.where((mod != 0.0) & ((b < 0.0) != (mod < 0.0)), mod + b, mod)


@triton.jit
def _floordiv_int(a, b):
    # Triton's // truncates; Python rounds down. Division by zero gives 0, as the C++ kernels
    zero = b == 0
    safe = tl.where(zero, 1, b)
    q = a // safe
    q = tl.where((q * safe != a) & ((a < 0) != (safe < 0)), q - 1, q)
    return tl.where(zero, 0, q)


@triton.jit
def _remainder_int(a, b):
    zero = b == 0
    safe = tl.where(zero, 1, b)
    r = a % safe
    r = tl.where((r != 0) & ((r < 0) != (safe < 0)), r + safe, r)
    return tl.where(zero, 0, r)


@triton.jit
def _fmod_int(a, b):
    zero = b == 0
    return tl.where(zero, 0, a % tl.where(zero, 1, b))
'''.strip()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a value of `dtype` is computed in: half types in float32."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if dtype not in TL_TYPES:
        raise Declined(f"dtype {dtype} has no Triton type")
    return dtype


def tl_type(dtype: torch.dtype) -> str:
    """The Triton type name of `dtype` (as stored: half types stay half)."""
    if dtype not in TL_TYPES:
        raise Declined(f"dtype {dtype} has no Triton type")
    return TL_TYPES[dtype]


# --- constants and casts ------------------------------------------------------------------

def literal(value: bool | int | float, dtype: torch.dtype) -> str:
    """A Python literal Triton reads as `dtype` next to a tensor of that dtype."""
    if dtype == torch.bool:
        return "True" if value else "False"
    if dtype.is_floating_point:
        value = float(value)
        if math.isnan(value):
            return 'float("nan")'
        if math.isinf(value):
            return 'float("inf")' if value > 0 else 'float("-inf")'
        return repr(value)
    return str(int(value))


def typed_const(value: bool | int | float, dtype: torch.dtype, block: str) -> str:
    """A `block` of `dtype`'s compute type: for constants with no tensor beside them."""
    return f"tl.full({block}, {literal(value, dtype)}, {tl_type(compute_dtype(dtype))})"


def render_cast(a: str, src: torch.dtype, dst: torch.dtype) -> str:
    """Convert a computed value of dtype `src` to `dst`'s compute type, rounding like eager."""
    if dst == torch.bool:
        return a if src == torch.bool else f"({a} != 0)"
    if dst == torch.float16:
        # through float32, as eager's Half(float(x)) does for every source type
        return f"{_to(a, src, torch.float32)}.to(tl.float16).to(tl.float32)"
    if dst == torch.bfloat16:
        return f"_round_to_bf16({_to(a, src, torch.float32)})"
    return _to(a, src, dst)


def _to(a: str, src: torch.dtype, dst: torch.dtype) -> str:
    if compute_dtype(src) == compute_dtype(dst):
        return a
    return f"{a}.to({tl_type(compute_dtype(dst))})"


def store_value(value: str, dtype: torch.dtype) -> str:
    """A computed value in the storage type of a `dtype` buffer."""
    if dtype == torch.float16:
        return f"{value}.to(tl.float16)"
    if dtype == torch.bfloat16:
        return f"_round_to_bf16({value}).to(tl.bfloat16)"
    return value


# --- pointwise ops ------------------------------------------------------------------------

_INFIX = {"add": "+", "sub": "-", "mul": "*", "truediv": "/", "bitwise_and": "&",
          "bitwise_or": "|", "bitwise_xor": "^", "eq": "==", "ne": "!=", "lt": "<", "le": "<=",
          "gt": ">", "ge": ">=", "logical_and": "&", "logical_or": "|", "logical_xor": "^"}
_FLOAT_UNARY = {
    "exp": "tl.exp({})", "exp2": "tl.exp2({})", "log": "tl.log({})", "log2": "tl.log2({})",
    "log10": "(tl.log({}) * 0.4342944819032518)", "sqrt": "_sqrt({})", "rsqrt": "tl.rsqrt({})",
    "sin": "tl.sin({})", "cos": "tl.cos({})", "tan": "(tl.sin({0}) / tl.cos({0}))",
    "erf": "tl.erf({})", "floor": "tl.floor({})", "ceil": "tl.ceil({})", "trunc": "_trunc({})",
    "round": "_round_half_even({})", "frac": "({0} - _trunc({0}))", "expm1": "_expm1({})",
    "log1p": "_log1p({})", "sinh": "_sinh({})", "cosh": "_cosh({})", "tanh": "_tanh({})",
    "asinh": "_asinh({})", "acosh": "_acosh({})", "atanh": "_atanh({})",
    "sigmoid": "(1.0 / (1.0 + tl.exp(-{})))", "reciprocal": "(1.0 / {})",
    "isnan": "({0} != {0})", "isinf": '(tl.abs({}) == float("inf"))',
    "isfinite": '(tl.abs({}) < float("inf"))', "signbit": "_signbit({})",
}
# Integer (and bool) versions; NaN and infinity tests are constant over integers but must keep
# the operand's shape, hence the self-comparisons.
_INT_UNARY = {
    "floor": "{}", "ceil": "{}", "trunc": "{}", "round": "{}", "isnan": "({0} != {0})",
    "isinf": "({0} != {0})", "isfinite": "({0} == {0})", "signbit": "({} < 0)",
}
_FLOAT_BINARY = {"floordiv": "_floordiv_float", "remainder": "_remainder_float",
                 "maximum": "_max_nan", "minimum": "_min_nan", "hypot": "_hypot"}
_INT_BINARY = {"floordiv": "_floordiv_int", "remainder": "_remainder_int", "fmod": "_fmod_int",
               "maximum": "tl.maximum", "minimum": "tl.minimum"}


def render_op(op: str, args: list[str], arg_dtypes: list[torch.dtype], dtype: torch.dtype
              ) -> str:
    """One IR op (other than pow, see _Scope.pow) as a Triton expression over named operands
    already in their compute types."""
    if op in UNSUPPORTED_OPS:
        raise Declined(f"op {op!r} is not rendered for Triton: {UNSUPPORTED_OPS[op]}")
    if op == "cast":
        return render_cast(args[0], arg_dtypes[0], dtype)
    if op == "where":
        return f"tl.where({args[0]}, {args[1]}, {args[2]})"
    operand = arg_dtypes[0]
    if operand == torch.bool:
        return _bool_op(op, args)
    if operand.is_floating_point:
        return _float_op(op, args)
    return _int_op(op, args, operand)


def _float_op(op: str, args: list[str]) -> str:
    if op in _INFIX:
        return f"({args[0]} {_INFIX[op]} {args[1]})"
    if op in _FLOAT_UNARY:
        return _FLOAT_UNARY[op].format(args[0])
    if op in _FLOAT_BINARY:
        return f"{_FLOAT_BINARY[op]}({args[0]}, {args[1]})"
    simple = {"neg": "(-{0})", "abs": "tl.abs({0})", "sign": "_sign({0})",
              "fmod": "({0} % {1})", "square": "({0} * {0})",
              "copysign": "tl.where(_signbit({1}), -tl.abs({0}), tl.abs({0}))"}
    if op in simple:
        return simple[op].format(*args)
    raise Declined(f"op {op!r} on floating-point values has no Triton rendering")


def _int_op(op: str, args: list[str], dtype: torch.dtype) -> str:
    if op == "truediv":
        raise Declined("integer truediv (eager promotes it to float before the IR sees it)")
    if op in _INFIX:
        return f"({args[0]} {_INFIX[op]} {args[1]})"
    if op in _INT_UNARY:
        return _INT_UNARY[op].format(args[0])
    if op in _INT_BINARY:
        return f"{_INT_BINARY[op]}({args[0]}, {args[1]})"
    unsigned = dtype == torch.uint8
    simple = {"neg": "(-{0})", "abs": "{0}" if unsigned else "tl.abs({0})",
              "sign": "_sign({0})", "bitwise_not": "(~{0})", "square": "({0} * {0})"}
    if op in simple:
        return simple[op].format(*args)
    raise Declined(f"op {op!r} on {dtype} has no Triton rendering")


def _bool_op(op: str, args: list[str]) -> str:
    """Bool operands: logic ops. Ordering compares widen to int8 first: i1 is a signed type
    to the GPU compiler (true < false) but a numpy bool to the interpreter."""
    if op in ("lt", "le", "gt", "ge"):
        return f"({args[0]}.to(tl.int8) {_INFIX[op]} {args[1]}.to(tl.int8))"
    logic = {"add": "|", "maximum": "|", "bitwise_or": "|", "logical_or": "|", "mul": "&",
             "minimum": "&", "bitwise_and": "&", "logical_and": "&", "bitwise_xor": "^",
             "logical_xor": "^", "eq": "==", "ne": "!="}
    if op in logic:
        return f"({args[0]} {logic[op]} {args[1]})"
    unary = {"logical_not": "({} == 0)", "bitwise_not": "({} == 0)", "abs": "{}", "sign": "{}",
             "square": "{}",
             "floor": "{}", "ceil": "{}", "trunc": "{}", "round": "{}", "isnan": "({0} != {0})",
             "isinf": "({0} != {0})", "isfinite": "({0} == {0})", "signbit": "({0} != {0})"}
    if op in unary:
        return unary[op].format(args[0])
    raise Declined(f"op {op!r} on bool has no Triton rendering")


def pow_plan(base: Expr, exponent: Expr) -> str | int:
    """How pow(base, exponent) is rendered: an int n (unrolled multiplications), "sqrt",
    "rsqrt", "exp2" or "exp2_neg"; Declined when only libdevice's pow could compute it."""
    if isinstance(exponent, Const):
        e = exponent.value
        if base.dtype.is_floating_point and e in (0.5, -0.5):
            return "sqrt" if e == 0.5 else "rsqrt"
        if float(e).is_integer() and abs(e) <= MAX_UNROLLED_EXPONENT:
            if e < 0 and not base.dtype.is_floating_point:
                raise Declined("integer pow with a negative exponent")
            return int(e)
    if isinstance(base, Const) and base.value in (2, 0.5) and exponent.dtype.is_floating_point:
        return "exp2" if base.value == 2 else "exp2_neg"  # 0.5 ** x is exactly 2 ** -x
    raise Declined("pow with a tensor or non-integer exponent needs libdevice's pow")


# --- expression emission ------------------------------------------------------------------

@dataclasses.dataclass
class _Layout:
    """Block shapes of the kernel being rendered: which masks cover which loop variables.
    Every value is a block (at least [XBLOCK], or [XBLOCK, 1] in a reduction kernel), never a
    scalar; only Python literals beside a block stay scalars."""

    reduction: bool
    outer: frozenset[sympy.Symbol]  # the outer loop variables

    def uses_outer(self, index: sympy.Expr) -> bool:
        return not self.outer.isdisjoint(sympy.sympify(index).free_symbols)

    def mask(self, on_x: bool, on_r: bool) -> str | None:
        """The mask of an access varying over the rows/points (x) and/or r; None: a scalar."""
        if on_x and on_r:
            return "xrmask"
        if on_r:
            return "rmask"
        return "xmask" if on_x else None

    def block(self, in_r_loop: bool) -> str:
        if not self.reduction:
            return "[XBLOCK]"
        return "[XBLOCK, RBLOCK]" if in_r_loop else "[XBLOCK, 1]"


class _Scope:
    """Emits expressions as named temporaries, each once (structural CSE). A loop over r is a
    child scope: expressions that do not depend on r are emitted into the parent, before the
    loop, and so are computed once per row instead of once per chunk."""

    def __init__(self, layout: _Layout, indent: str, counter: list[int],
                 parent: _Scope | None = None) -> None:
        self.layout = layout
        self.indent = indent
        self.counter = counter
        self.parent = parent
        self.lines: list[str] = []
        self.names: dict[object, str] = {}

    def emit(self, text: str) -> str:
        name = f"t{self.counter[0]}"
        self.counter[0] += 1
        self.lines.append(f"{self.indent}{name} = {text}")
        return name

    def lookup(self, key: object) -> str | None:
        if key in self.names:
            return self.names[key]
        return self.parent.lookup(key) if self.parent is not None else None

    def value(self, e: Expr) -> str:
        """The name (or literal) holding `e`."""
        if isinstance(e, Const):
            return typed_const(e.value, e.dtype, self.layout.block(in_r_loop=False))
        if isinstance(e, ReductionResult):
            found = self.lookup((e.reduction, e.output))
            if found is None:
                raise KeyError(f"reduction result used before its loop: {e}")
            return found
        if self.parent is not None and not depends_on(e, REDUCTION_VAR):
            return self.parent.value(e)
        found = self.lookup(e)
        if found is None:
            found = self.emit(self._render(e))
            self.names[e] = found
        return found

    def _render(self, e: Expr) -> str:
        if isinstance(e, Load):
            return self._load(e)
        if isinstance(e, IndexValue):
            value = f"tl.cast({index_source(e.index)}, {tl_type(compute_dtype(e.dtype))})"
            if self.layout.uses_outer(e.index) or REDUCTION_VAR in e.index.free_symbols:
                return value
            return f"tl.broadcast_to({value}, {self.layout.block(in_r_loop=False)})"
        if isinstance(e, Op):
            if e.op == "pow":
                return self.pow(e)
            args = [self.operand(a, e) for a in e.args]
            return render_op(e.op, args, [a.dtype for a in e.args], e.dtype)
        raise NotImplementedError(type(e))

    def operand(self, a: Expr, op: Op) -> str:
        """An argument of `op`: a bare literal when a tensor of its type sits beside it (Triton
        then gives the literal that type), else a typed constant."""
        if isinstance(a, Const) and op.op != "cast" and any(
                not isinstance(b, Const) and compute_dtype(b.dtype) == compute_dtype(a.dtype)
                for b in op.args):
            if _fits(a.value, compute_dtype(a.dtype)):
                return literal(a.value, a.dtype)
        return self.value(a)

    def _load(self, e: Load) -> str:
        index = sympy.sympify(e.index)
        mask = self.layout.mask(self.layout.uses_outer(index),
                                REDUCTION_VAR in index.free_symbols)
        pointer = f"{e.buffer} + {index_source(index)}"
        if mask is None:
            # a block of one value, not a scalar: the interpreter mistypes comparisons of
            # scalars (their int1 result is splat into a block as the operands' type)
            text = f"tl.load(tl.broadcast_to({pointer}, {self.layout.block(in_r_loop=False)}))"
        else:
            other = literal(0, e.dtype) if e.dtype.is_floating_point else "0"
            text = f"tl.load({pointer}, mask={mask}, other={other})"
        half = e.dtype in (torch.float16, torch.bfloat16)
        return f"{text}.to(tl.float32)" if half else text

    def pow(self, e: Op) -> str:
        base, exponent = e.args
        plan = pow_plan(base, exponent)
        if plan in ("exp2", "exp2_neg"):
            sign = "-" if plan == "exp2_neg" else ""
            return f"tl.exp2({sign}{self.value(exponent)})"
        x = self.value(base)
        if plan == "sqrt":
            return f"_sqrt({x})"
        if plan == "rsqrt":
            return f"(1.0 / _sqrt({x}))"
        if plan == 0:
            return typed_const(1, e.dtype, self.layout.block(in_r_loop=False))
        power = self._power(x, abs(plan))
        return f"(1.0 / {power})" if plan < 0 else power

    def _power(self, x: str, n: int) -> str:
        """x ** n by repeated squaring, n >= 1."""
        result, square = None, x
        while True:
            if n & 1:
                result = square if result is None else self.emit(f"{result} * {square}")
            n >>= 1
            if not n:
                return result
            square = self.emit(f"{square} * {square}")


def _fits(value: bool | int | float, dtype: torch.dtype) -> bool:
    """Does Triton read `value` as a `dtype` literal beside a `dtype` tensor? (It rejects
    integers out of the type's range, and negative ones next to unsigned types.)"""
    if dtype == torch.bool:
        return True
    if dtype.is_floating_point:
        # Triton types a float literal outside float32's normal range as float64
        v = abs(float(value))
        return dtype == torch.float64 or v in (0.0, math.inf) or math.isnan(v) or (
            2.0**-126 <= v <= torch.finfo(torch.float32).max)
    info = torch.iinfo(dtype)
    return info.min <= int(value) <= info.max


# --- kernels ------------------------------------------------------------------------------

def render_kernel(kernel: Kernel) -> str:
    """The kernel as one `@triton.jit` function (the shared PRELUDE is rendered once per
    module: see render_source)."""
    reduction = kernel.reduction_range is not None
    params = [b.name for b in (*kernel.inputs, *kernel.outputs)]
    params += [s.name for s in kernel.size_args]
    params += ["XBLOCK: tl.constexpr"] + (["RBLOCK: tl.constexpr"] if reduction else [])
    for b in (*kernel.inputs, *kernel.outputs):
        tl_type(b.dtype)  # declines dtypes Triton has no pointer type for
    lines = ["@triton.jit", f"def {kernel.name}({', '.join(params)}):"]
    # sizes arrive as int32 when they fit; products of them must not wrap
    lines += [f"    {s.name} = tl.cast({s.name}, tl.int64)" for s in kernel.size_args]
    lines.append(f"    xnumel = {index_source(grid_numel(kernel))}")
    body = _render_reduction(kernel) if reduction else _render_pointwise(kernel)
    return _renumber("\n".join(lines + body) + "\n")


def _renumber(source: str) -> str:
    """Number temporaries in the order they appear (hoisting emits them out of order)."""
    order: dict[str, str] = {}
    for name in re.findall(r"\bt\d+\b", source):
        order.setdefault(name, f"t{len(order)}")
    return re.sub(r"\bt\d+\b", lambda m: order[m.group(0)], source)


def grid_numel(kernel: Kernel) -> sympy.Expr:
    """The number of points (pointwise) or rows (reduction) the grid covers."""
    return sympy.Mul(*kernel.ranges)


def _render_pointwise(kernel: Kernel) -> list[str]:
    lines = ["    xindex = tl.program_id(0).to(tl.int64) * XBLOCK + tl.arange(0, XBLOCK)",
             "    xmask = xindex < xnumel"]
    lines += _delinearize(kernel)
    scope = _Scope(_Layout(False, _outer_vars(kernel)), "    ", [0])
    _stores(kernel.stores, kernel, scope, in_r_loop=False)
    return lines + scope.lines


def _outer_vars(kernel: Kernel) -> frozenset[sympy.Symbol]:
    return frozenset(outer_var(k) for k in range(len(kernel.ranges)))


def _delinearize(kernel: Kernel) -> list[str]:
    """i0, i1, ... from the flat xindex (the last range varies fastest)."""
    lines, rest = [], "xindex"
    for k in range(len(kernel.ranges) - 1, -1, -1):
        if k == 0:
            lines.append(f"    {outer_var(k)} = {rest}")
        else:
            size = index_source(kernel.ranges[k])
            lines.append(f"    {outer_var(k)} = {rest} % {size}")
            rest = f"({rest} // {size})"
    return lines


def _stores(stores: Sequence[Store], kernel: Kernel, scope: _Scope, in_r_loop: bool) -> None:
    """Masked stores; a pointer that does not vary over the whole block is broadcast to it so
    that the mask (which does) fits."""
    mask = "xrmask" if in_r_loop else "xmask"
    for store in stores:
        buffer = next(b for b in kernel.outputs if b.name == store.buffer)
        value = scope.value(store.value)
        if store.value.dtype != buffer.dtype:
            value = render_cast(value, store.value.dtype, buffer.dtype)
        index = sympy.sympify(store.index)
        pointer = f"{store.buffer} + {index_source(index)}"
        covers_block = scope.layout.uses_outer(index) and (
            not in_r_loop or REDUCTION_VAR in index.free_symbols)
        if not covers_block:
            pointer = f"tl.broadcast_to({pointer}, {scope.layout.block(in_r_loop)})"
        scope.lines.append(f"{scope.indent}tl.store({pointer}, "
                           f"{store_value(value, buffer.dtype)}, mask={mask})")


def _render_reduction(kernel: Kernel) -> list[str]:
    lines = [f"    rnumel = {index_source(kernel.reduction_range)}",
             "    xindex = tl.program_id(0).to(tl.int64) * XBLOCK + tl.arange(0, XBLOCK)[:, None]",
             "    xmask = xindex < xnumel",
             "    rbase = tl.arange(0, RBLOCK)[None, :].to(tl.int64)"]
    lines += _delinearize(kernel)
    row = _Scope(_Layout(True, _outer_vars(kernel)), "    ", [0])
    levels = reduction_levels(kernel)
    for level in sorted(set(levels.values())):
        reds = [r for r, lv in levels.items() if lv == level]
        _reduction_loop(row, reds, level)
    row_stores = [s for s in kernel.stores if REDUCTION_VAR not in s.index.free_symbols]
    _stores(row_stores, kernel, row, in_r_loop=False)
    loop_stores = [s for s in kernel.stores if REDUCTION_VAR in s.index.free_symbols]
    if loop_stores:
        loop = _Scope(row.layout, "        ", row.counter, parent=row)
        _stores(loop_stores, kernel, loop, in_r_loop=True)
        row.lines += ["    # stores that depend on r", *_loop_head(), *loop.lines]
    return lines + row.lines


def _loop_head() -> list[str]:
    return ["    for roffset in range(0, rnumel, RBLOCK):",
            "        r = roffset + rbase",
            "        rmask = r < rnumel",
            "        xrmask = xmask & rmask"]


# --- reductions ---------------------------------------------------------------------------

@dataclasses.dataclass
class _Acc:
    """One reduction's per-lane accumulator tile: its init, per-chunk step and final fold."""

    red: Reduction
    name: str  # the accumulator tile
    result: str  # the folded row result

    @property
    def t(self) -> str:
        # bool max/min accumulate in int8: i1 orders true below false on the GPU
        dtype = compute_dtype(self.red.dtype)
        return "tl.int8" if dtype == torch.bool else tl_type(dtype)

    def init(self) -> list[str]:
        n, kind, block = self.name, self.red.kind, "[XBLOCK, RBLOCK]"
        if kind == "welford":
            return [f"    {n}_{part} = tl.full({block}, 0, {self.t})" for part in
                    ("mean", "m2", "n")]
        lines = [f"    {n} = tl.full({block}, {self._start()}, {self.t})"]
        if kind in ("argmax", "argmin"):
            # the largest index marks an empty lane: it takes the first value it sees and
            # loses every tie when lanes merge
            lines.append(f"    {n}_idx = tl.full({block}, {EMPTY_LANE}, tl.int64)")
        return lines

    def _start(self) -> str:
        kind, dtype = self.red.kind, compute_dtype(self.red.dtype)
        if kind == "sum":
            return "0"
        if kind == "prod":
            return "1"
        high = kind in ("min", "argmin")
        if dtype.is_floating_point:
            return 'float("inf")' if high else 'float("-inf")'
        if dtype == torch.bool:
            return "1" if high else "0"
        info = torch.iinfo(dtype)
        return str(info.max if high else info.min)

    def step(self, v: str) -> list[str]:
        n, kind, ind = self.name, self.red.kind, "        "
        if compute_dtype(self.red.dtype) == torch.bool:
            v = f"{v}.to(tl.int8)"
        if kind == "welford":
            state = f"{n}_mean, {n}_m2, {n}_n"
            return [f"{ind}{state} = _welford_step({state}, {v}, xrmask)"]
        if kind in ("argmax", "argmin"):
            return [f"{ind}{n}_take = xrmask & _{kind}_take({n}, {n}_idx, {v})",
                    f"{ind}{n}_idx = tl.where({n}_take, r, {n}_idx)",
                    f"{ind}{n} = tl.where({n}_take, {v}, {n})"]
        update = {"sum": f"{n} + {v}", "prod": f"{n} * {v}", "max": f"_max_nan({n}, {v})",
                  "min": f"_min_nan({n}, {v})"}[kind]
        return [f"{ind}{n} = tl.where(xrmask, {update}, {n})"]

    def finish(self, results: dict[object, str]) -> list[str]:
        """Fold the lanes of each row; results are [XBLOCK, 1] columns."""
        n, kind, red, out, ind = self.name, self.red.kind, self.red, self.result, "    "
        if kind == "welford":
            parts = [f"{n}_mean", f"{n}_m2", f"{n}_n"]
            k = out[len(kind):]
            names = [f"mean{k}", f"m2_{k}", f"count{k}"]
            lines = [f"{ind}{', '.join(names)} = tl.reduce(({', '.join(parts)}), 1, "
                     "_welford_combine)"]
            for k, name in enumerate(names):
                lines.append(f"{ind}{name} = {name}[:, None]")
                results[(red, k)] = name
            return lines
        if kind in ("argmax", "argmin"):
            results[(red, 0)] = out
            return [f"{ind}_, {out} = tl.reduce(({n}, {n}_idx), 1, _{kind}_combine)",
                    f"{ind}{out} = {out}[:, None]"]
        fold = {"sum": f"tl.reduce({n}, 1, _add)", "prod": f"tl.reduce({n}, 1, _mul)",
                "max": f"tl.reduce({n}, 1, _max_nan)", "min": f"tl.reduce({n}, 1, _min_nan)"}
        suffix = " != 0" if compute_dtype(red.dtype) == torch.bool else ""
        results[(red, 0)] = out
        return [f"{ind}{out} = {fold[kind]}[:, None]{suffix}"]


def _reduction_loop(row: _Scope, reds: list[Reduction], level: int) -> None:
    """One loop over r computing `reds` (whose inputs are all known before it)."""
    first = sum(1 for key in row.names if isinstance(key, tuple) and key[1] == 0)
    accs = [_Acc(r, f"acc{first + k}", f"{r.kind}{first + k}") for k, r in enumerate(reds)]
    loop = _Scope(row.layout, "        ", row.counter, parent=row)
    steps: list[str] = []
    for a in accs:
        v = loop.value(a.red.value)
        steps += loop.lines + a.step(v)
        loop.lines = []
    row.lines.append(f"    # loop {level}: {', '.join(r.kind for r in reds)}")
    for a in accs:
        row.lines += a.init()
    row.lines += _loop_head() + steps
    results: dict[object, str] = {}
    for a in accs:
        row.lines += a.finish(results)
    row.names.update(results)
