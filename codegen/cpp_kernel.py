"""Render a kernel_ir.Kernel as C++: plain loops the compiler vectorizes, OpenMP over rows.

Shape of the code:
  * pointwise kernels: one flat loop when every access is contiguous (collapse_ranges merged
    the dims), else a parallel loop over all outer rows and a `#pragma omp simd` inner loop;
  * reduction kernels: a parallel loop over rows; in each row one loop over r per reduction
    level (softmax: max, then sum of exp), each accumulating in LANES independent lanes so the
    compiler can vectorize a reduction without -ffast-math, then a loop writing the row.
Half types are stored as such and computed in float; math functions are declared SIMD so
glibc's libmvec supplies vector versions (accurate to a few ulp, special values handled).
"""

from __future__ import annotations

import dataclasses

import sympy
import torch

from jitopt.codegen.kernel_ir import (
    REDUCTION_VAR, Const, Expr, IndexValue, Kernel, Load, Op, Reduction, ReductionResult,
    compute_dtype, depends_on, index_source, outer_var, reduction_levels)

# Below this many elements a kernel runs on one thread: an OpenMP fork costs a few us.
PARALLEL_THRESHOLD = 32768
# Elements per parallel chunk of a flat pointwise loop.
CHUNK = 4096
CACHE_LINE = 64

STORAGE_TYPES = {
    torch.float32: "float", torch.float64: "double", torch.float16: "_Float16",
    torch.bfloat16: "uint16_t", torch.int64: "int64_t", torch.int32: "int32_t",
    torch.int16: "int16_t", torch.int8: "int8_t", torch.uint8: "uint8_t", torch.bool: "bool",
}


def compute_type(dtype: torch.dtype) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "float"
    if dtype not in STORAGE_TYPES:
        raise NotImplementedError(f"dtype {dtype} has no C++ kernel type")
    return STORAGE_TYPES[dtype]


def lanes(dtype: torch.dtype) -> int:
    """Independent accumulators per reduction: two 512-bit vectors' worth."""
    return 128 // dtype.itemsize


PRELUDE = r"""
#include <cstdint>
#include <cmath>
#include <limits>

// Vector variants from glibc's libmvec (declared the way <math.h> does under -ffast-math).
#define JO_SIMD __attribute__((simd("notinbranch")))
extern "C" {
JO_SIMD float expf(float); JO_SIMD float logf(float); JO_SIMD float sinf(float);
JO_SIMD float cosf(float); JO_SIMD float tanf(float); JO_SIMD float tanhf(float);
JO_SIMD float erff(float); JO_SIMD float erfcf(float); JO_SIMD float expm1f(float);
JO_SIMD float log1pf(float); JO_SIMD float log2f(float); JO_SIMD float log10f(float);
JO_SIMD float exp2f(float); JO_SIMD float asinf(float); JO_SIMD float acosf(float);
JO_SIMD float atanf(float); JO_SIMD float sinhf(float); JO_SIMD float coshf(float);
JO_SIMD float asinhf(float); JO_SIMD float acoshf(float); JO_SIMD float atanhf(float);
JO_SIMD float powf(float, float); JO_SIMD float atan2f(float, float);
JO_SIMD float hypotf(float, float);
JO_SIMD double exp(double); JO_SIMD double log(double); JO_SIMD double tanh(double);
}

// exp in float, inline so GCC vectorizes and schedules it with the loop around it: a libmvec
// call per vector costs softmax a tenth of its time in spills. Cephes' method: x = n ln2 + r,
// |r| <= ln2/2, a degree-6 polynomial for exp(r), then 2^n in two factors so results down to
// denormals and up to inf come out right. At most 1.02 ulp from the exact result (checked over
// every 7th float in [-103, 88.72]), like eager's Sleef expf (1.0 ulp).
// The clamp bounds live in a writable hidden global because, as constants, GCC distributes
// the multiply below into the arms of each select and vectorizes the clamp as five compares
// and blends; read from memory it stays vmaxps/vminps (softmax 20% faster). In that operand
// order a NaN x passes both unchanged and comes out of the polynomial as NaN.
__attribute__((visibility("hidden"))) float jo_exp_range[2] = {-104.0f, 88.8f};
static inline float jo_expf(float x) {
  float c = jo_exp_range[0] > x ? jo_exp_range[0] : x;
  c = jo_exp_range[1] < c ? jo_exp_range[1] : c;
  const float n = __builtin_rintf(c * 1.44269504088896341f);
  float r = c - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + r + 1.0f;
  const int32_t k = int32_t(n), half = k >> 1;
  const int32_t a_bits = (half + 127) << 23, b_bits = (k - half + 127) << 23;
  float a, b;
  __builtin_memcpy(&a, &a_bits, 4);
  __builtin_memcpy(&b, &b_bits, 4);
  return p * a * b;
}

static inline float jo_bf16_load(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16; float f; __builtin_memcpy(&f, &bits, 4); return f;
}
static inline float jo_bf16_round(float f) {  // round to nearest even, NaN stays NaN
  uint32_t bits; __builtin_memcpy(&bits, &f, 4);
  bits = (f != f) ? (bits | 0x400000u) : bits + 0x7fffu + ((bits >> 16) & 1u);
  bits &= 0xffff0000u; float r; __builtin_memcpy(&r, &bits, 4); return r;
}
static inline uint16_t jo_bf16_store(float f) {
  float r = jo_bf16_round(f); uint32_t bits; __builtin_memcpy(&bits, &r, 4);
  return uint16_t(bits >> 16);
}
// NaN-propagating max/min, as torch.maximum and the max reduction.
template <typename T> static inline T jo_max(T a, T b) { return (a != a || a > b) ? a : b; }
template <typename T> static inline T jo_min(T a, T b) { return (a != a || a < b) ? a : b; }
template <typename T> static inline T jo_floordiv(T a, T b) {
  if constexpr (std::is_integral_v<T>) {
    if (b == 0) return 0;
    T q = a / b; return (q * b != a && ((a < 0) != (b < 0))) ? q - 1 : q;
  } else {
    // c10::div_floor_floating, as eager: floor(a / b) would round the quotient first
    // (1 // 0.1 is 9, not 10), and -1 // inf is -1, inf // 2 is nan.
    if (b == 0) return a / b;
    const T mod = std::fmod(a, b);
    T div = (a - mod) / b;
    if (mod != 0 && ((b < 0) != (mod < 0))) div -= T(1);
    if (div == 0) return std::copysign(T(0), a / b);
    const T fl = std::floor(div);
    return (div - fl > T(0.5)) ? fl + T(1) : fl;
  }
}
template <typename T> static inline T jo_remainder(T a, T b) {
  if constexpr (std::is_integral_v<T>) {
    if (b == 0) return 0;
    T r = a % b; return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r;
  } else {
    T r = std::fmod(a, b); return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r;
  }
}
template <typename T> static inline T jo_fmod(T a, T b) {
  if constexpr (std::is_integral_v<T>) { return b == 0 ? 0 : a % b; }
  else { return std::fmod(a, b); }
}
template <typename T> static inline T jo_ipow(T base, T exp) {
  if (exp < 0) return (base == 1) ? 1 : (base == -1 ? ((exp & 1) ? -1 : 1) : 0);
  T result = 1;
  while (exp) { if (exp & 1) result *= base; base *= base; exp >>= 1; }
  return result;
}
template <typename T> static inline T jo_sign(T x) { return T((x > 0) - (x < 0)); }
// The sign bit itself: GCC 12 crashes (ICE in extract_insn) vectorizing std::signbit of a
// float built from bfloat16 bits.
template <typename T> static inline bool jo_signbit(T x) {
  if constexpr (sizeof(T) == 4) { int32_t b; __builtin_memcpy(&b, &x, 4); return b < 0; }
  else { int64_t b; __builtin_memcpy(&b, &x, 8); return b < 0; }
}
// Arg-reduction step: does (v, i) replace the current best? NaN wins, ties keep the first.
template <typename T> static inline bool jo_argmax_take(T best, T v) {
  return (v > best) || (v != v && best == best);
}
template <typename T> static inline bool jo_argmin_take(T best, T v) {
  return (v < best) || (v != v && best == best);
}
// Merging partial results: the same order, ties (and NaN against NaN) go to the lower index.
template <typename T>
static inline bool jo_argmax_better(T bv, int64_t bi, T v, int64_t i) {
  const bool vn = v != v, bn = bv != bv;
  if (vn || bn) return vn && (!bn || i < bi);
  return v > bv || (v == bv && i < bi);
}
template <typename T>
static inline bool jo_argmin_better(T bv, int64_t bi, T v, int64_t i) {
  const bool vn = v != v, bn = bv != bv;
  if (vn || bn) return vn && (!bn || i < bi);
  return v < bv || (v == bv && i < bi);
}
"""

_UNARY_FLOAT = {
    "exp": "exp", "exp2": "exp2", "expm1": "expm1", "log": "log", "log2": "log2",
    "log10": "log10", "log1p": "log1p", "sin": "sin", "cos": "cos", "tan": "tan", "asin": "asin",
    "acos": "acos", "atan": "atan", "sinh": "sinh", "cosh": "cosh", "tanh": "tanh",
    "asinh": "asinh", "acosh": "acosh", "atanh": "atanh", "erf": "erf", "erfc": "erfc",
    "sqrt": "sqrt", "floor": "floor", "ceil": "ceil", "trunc": "trunc", "round": "nearbyint",
}
_BINARY_FLOAT = {"atan2": "atan2", "hypot": "hypot", "copysign": "copysign"}
_INFIX = {"add": "+", "sub": "-", "mul": "*", "truediv": "/", "bitwise_and": "&",
          "bitwise_or": "|", "bitwise_xor": "^", "eq": "==", "ne": "!=", "lt": "<", "le": "<=",
          "gt": ">", "ge": ">=", "logical_and": "&&", "logical_or": "||", "logical_xor": "!="}


def _math(name: str, dtype: torch.dtype) -> str:
    """The C function for a math op in `dtype`'s compute type (float gets the f suffix)."""
    if compute_type(dtype) == "double":
        return f"std::{name}"
    return "jo_expf" if name == "exp" else f"{name}f"


def render_op(op: str, args: list[str], arg_dtypes: list[torch.dtype], dtype: torch.dtype) -> str:
    """One IR op as a C++ expression over already-named operands."""
    a = args[0] if args else ""
    t = compute_type(dtype)
    floating = dtype.is_floating_point
    if op == "cast":
        return _cast(a, arg_dtypes[0], dtype)
    if op in ("add", "mul") and dtype == torch.bool:
        return f"({a} {'||' if op == 'add' else '&&'} {args[1]})"
    if op in _INFIX:
        return f"({a} {_INFIX[op]} {args[1]})"
    if op in _UNARY_FLOAT and floating:
        return f"{_math(_UNARY_FLOAT[op], dtype)}({a})"
    if op in ("floor", "ceil", "trunc", "round"):
        return a  # integers are already whole
    if op in _BINARY_FLOAT:
        return f"{_math(_BINARY_FLOAT[op], dtype)}({a}, {args[1]})"
    simple = {
        "neg": f"(-{a})", "reciprocal": f"({t}(1) / {a})", "sigmoid": f"({t}(1) / ({t}(1) + "
        f"{_math('exp', dtype)}(-{a})))", "rsqrt": f"({t}(1) / {_math('sqrt', dtype)}({a}))",
        "logical_not": f"(!{a})", "bitwise_not": f"(!{a})" if dtype == torch.bool else f"(~{a})",
        "sign": f"jo_sign<{t}>({a})", "frac": f"({a} - {_math('trunc', dtype)}({a}))",
    }
    if op in simple:
        return simple[op]
    if op == "abs":
        return f"std::abs({a})" if dtype != torch.bool else a
    if op in ("maximum", "minimum"):
        return f"jo_{op[:3]}<{t}>({a}, {args[1]})"
    if op in ("floordiv", "remainder", "fmod"):
        return f"jo_{op}<{t}>({a}, {args[1]})"
    if op == "pow":
        return f"{_math('pow', dtype)}({a}, {args[1]})" if floating else \
            f"jo_ipow<{t}>({a}, {args[1]})"
    if op == "where":
        return f"({a} ? {args[1]} : {args[2]})"
    if op in ("isnan", "isinf", "isfinite", "signbit"):
        return _predicate(op, a, arg_dtypes[0])
    raise NotImplementedError(f"no C++ rendering for op {op!r}")


def _predicate(op: str, a: str, dtype: torch.dtype) -> str:
    if not dtype.is_floating_point:
        return {"isnan": "false", "isinf": "false", "isfinite": "true",
                "signbit": f"({a} < 0)" if dtype != torch.bool else "false"}[op]
    return {"isnan": f"({a} != {a})", "isinf": f"(std::abs({a}) == INFINITY)",
            "isfinite": f"(std::abs({a}) < INFINITY)", "signbit": f"jo_signbit({a})"}[op]


def _cast(a: str, src: torch.dtype, dst: torch.dtype) -> str:
    if dst == torch.bool:
        return f"({a} != 0)"
    if dst == torch.float16:
        return f"float(_Float16({a}))"
    if dst == torch.bfloat16:
        return f"jo_bf16_round(float({a}))"
    return f"{compute_type(dst)}({a})"


def _const(value: bool | int | float, dtype: torch.dtype) -> str:
    t = compute_type(dtype)
    if dtype == torch.bool:
        return "true" if value else "false"
    if dtype.is_floating_point:
        if value != value:
            return f"std::numeric_limits<{t}>::quiet_NaN()"
        if value in (float("inf"), float("-inf")):
            sign = "-" if value < 0 else ""
            return f"{sign}std::numeric_limits<{t}>::infinity()"
        text = repr(float(value))
        return f"{text}f" if t == "float" else text
    if dtype == torch.int64 and value == -2**63:
        return "std::numeric_limits<int64_t>::min()"
    return f"{t}({int(value)}LL)" if t == "int64_t" else f"{t}({int(value)})"


def _load(buffer: str, index: str, dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16:
        return f"jo_bf16_load({buffer}[{index}])"
    if dtype == torch.float16:
        return f"float({buffer}[{index}])"
    return f"{buffer}[{index}]"


def _store_value(value: str, dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16:
        return f"jo_bf16_store({value})"
    if dtype == torch.float16:
        return f"_Float16({value})"
    return value


class _Body:
    """Emits expressions as named temporaries, each once per scope (structural CSE)."""

    def __init__(self, indent: str, known: dict[object, str] | None = None) -> None:
        self.lines: list[str] = []
        self.indent = indent
        self.names: dict[object, str] = dict(known or {})

    def value(self, e: Expr, counter: list[int]) -> str:
        if e in self.names:
            return self.names[e]
        if isinstance(e, Const):
            return _const(e.value, e.dtype)
        if isinstance(e, Load):
            text = _load(e.buffer, index_source(e.index), e.dtype)
        elif isinstance(e, IndexValue):
            text = f"{compute_type(e.dtype)}({index_source(e.index)})"
        elif isinstance(e, Op):
            args = [self.value(a, counter) for a in e.args]
            text = render_op(e.op, args, [a.dtype for a in e.args], e.dtype)
        elif isinstance(e, ReductionResult):
            raise KeyError(f"reduction result used before its loop: {e}")
        else:
            raise NotImplementedError(type(e))
        name = f"t{counter[0]}"
        counter[0] += 1
        self.lines.append(f"{self.indent}const {compute_type(e.dtype)} {name} = {text};")
        self.names[e] = name
        return name


def render_kernel(kernel: Kernel) -> str:
    """The kernel as one `extern "C"` function (the shared PRELUDE is rendered once per file)."""
    params = [f"const {STORAGE_TYPES[b.dtype]}* __restrict__ {b.name}" for b in kernel.inputs]
    params += [f"{STORAGE_TYPES[b.dtype]}* __restrict__ {b.name}" for b in kernel.outputs]
    params += [f"const int64_t {s.name}" for s in kernel.size_args]
    head = f'extern "C" void {kernel.name}({", ".join(params)}) {{'
    body = (_render_reduction(kernel) if kernel.reduction_range is not None
            else _render_pointwise(kernel))
    return "\n".join([head, *body, "}"])


def _render_pointwise(kernel: Kernel) -> list[str]:
    ranges = [index_source(r) for r in kernel.ranges]
    numel = index_source(kernel.numel)
    counter = [0]
    if not ranges:
        return _stores(kernel, _Body("  "), counter)
    inner = outer_var(len(ranges) - 1)
    if len(ranges) == 1:
        lines = [f"  const int64_t chunks = ({ranges[0]} + {CHUNK - 1}) / {CHUNK};",
                 f"  #pragma omp parallel for schedule(static) if({numel} >= {PARALLEL_THRESHOLD})",
                 "  for (int64_t chunk = 0; chunk < chunks; ++chunk) {",
                 f"    const int64_t end = chunk * {CHUNK} + {CHUNK} < {ranges[0]} ? "
                 f"chunk * {CHUNK} + {CHUNK} : {ranges[0]};",
                 "    #pragma omp simd",
                 f"    for (int64_t {inner} = chunk * {CHUNK}; {inner} < end; ++{inner}) {{"]
    else:
        rows = " * ".join(ranges[:-1])
        lines = [f"  #pragma omp parallel for schedule(static) if({numel} >= {PARALLEL_THRESHOLD})",
                 f"  for (int64_t row = 0; row < {rows}; ++row) {{",
                 *_delinearize("row", ranges[:-1], "    "),
                 "    #pragma omp simd",
                 f"    for (int64_t {inner} = 0; {inner} < {ranges[-1]}; ++{inner}) {{"]
    lines += _stores(kernel, _Body("      "), counter)
    return lines + ["    }", "  }"]


def _delinearize(flat: str, ranges: list[str], indent: str) -> list[str]:
    lines, rest = [], flat
    for k in range(len(ranges) - 1, -1, -1):
        if k == 0:
            lines.append(f"{indent}const int64_t {outer_var(k)} = {rest};")
        else:
            lines.append(f"{indent}const int64_t {outer_var(k)} = {rest} % {ranges[k]};")
            rest = f"({rest} / {ranges[k]})"
    return lines


def _stores(kernel: Kernel, body: _Body, counter: list[int], only=None) -> list[str]:
    for store in kernel.stores:
        if only is not None and not only(store):
            continue
        buffer = next(b for b in kernel.outputs if b.name == store.buffer)
        value = body.value(store.value, counter)
        if store.value.dtype != buffer.dtype:
            value = _cast(value, store.value.dtype, buffer.dtype)
        body.lines.append(f"{body.indent}{store.buffer}[{index_source(store.index)}] = "
                          f"{_store_value(value, buffer.dtype)};")
    return body.lines


def _render_reduction(kernel: Kernel) -> list[str]:
    outer = [index_source(r) for r in kernel.ranges]
    rsize = index_source(kernel.reduction_range)
    rows = " * ".join(outer) if outer else "1"
    levels = reduction_levels(kernel)
    lines = [f"  #pragma omp parallel for schedule(static) "
             f"if({index_source(kernel.numel)} >= {PARALLEL_THRESHOLD})",
             f"  for (int64_t row = 0; row < {rows}; ++row) {{",
             *_delinearize("row", outer, "    ")]
    known: dict[object, str] = {}
    counter = [0]
    row_stores = lambda s: REDUCTION_VAR not in s.index.free_symbols  # noqa: E731
    final = [s.value for s in kernel.stores if not row_stores(s)]
    cache = _row_cache(kernel, levels, final)
    lines += [f"    {decl}  // saved by loop {level}" for level, _, decl in cache.values() if decl]
    passes = sorted(set(levels.values()))
    for level in passes:
        reds = [r for r, lv in levels.items() if lv == level]
        saves = {e: where for e, (lv, where, _) in cache.items() if lv == level}
        again = level != passes[-1] or bool(final)  # does a later pass reread this row?
        lines += _reduction_loop(reds, rsize, known, counter, saves,
                                 prefetch_rows=len(outer) if level == passes[0] and again else 0)
    scalar = _Body("    ", known)
    lines += _stores(kernel, scalar, counter, only=row_stores)
    if final:
        lines += ["    #pragma omp simd", f"    for (int64_t r = 0; r < {rsize}; ++r) {{"]
        # Read every saved value before any store of this element can overwrite one.
        body = _Body("      ", known)
        for k, (e, (_, where, _)) in enumerate(cache.items()):
            body.lines.append(f"      const {compute_type(e.dtype)} saved{k} = {where};")
            body.names[e] = f"saved{k}"
        lines += _stores(kernel, body, counter, only=lambda s: not row_stores(s))
        lines.append("    }")
    return lines + ["  }"]


# Ops worth a store and a load to avoid computing twice (softmax's exp: eager's kernel computes
# it once, and a second libmvec exp per element costs more than the row's memory traffic).
_EXPENSIVE = frozenset({"exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "tanh", "erf",
                        "erfc", "sigmoid", "pow", "sin", "cos", "tan", "atan", "atan2"})
# A row cache lives on the stack of the thread computing the row: bounded.
ROW_CACHE_BYTES = 64 * 1024


def _row_cache(kernel: Kernel, levels: dict[Reduction, int], final: list[Expr]
               ) -> dict[Expr, tuple[int, str, str | None]]:
    """Expensive per-element values the final loop would recompute from a reduction loop:
    the last loop computing each saves it, the final loop reads it back. Where it goes:
    the element of an output the final loop overwrites anyway, when one has the value's
    dtype (as eager's softmax keeps exp in its output); else a row-sized array on the stack.
    Returns value -> (loop level, the location for element r, its declaration or None)."""
    wanted = {e for v in final for e in _subexpressions(v)
              if isinstance(e, Op) and _costly(e) and depends_on(e, REDUCTION_VAR)}
    found: dict[Expr, int] = {}
    for red, level in levels.items():
        for e in _subexpressions(red.value):
            if e in wanted:
                found[e] = max(level, found.get(e, 0))
    # Only the outermost such values: saving exp(x - m) makes saving x - m pointless.
    inner = {e for f in found for e in _subexpressions(f) if e is not f}
    size = kernel.reduction_range
    static = isinstance(size, int) or getattr(size, "is_Integer", False)
    dtypes = {b.name: b.dtype for b in kernel.outputs}
    taken: set[str] = set()
    cache, budget = {}, ROW_CACHE_BYTES
    for k, (e, level) in enumerate(kv for kv in found.items() if kv[0] not in inner):
        store = next((st for st in kernel.stores if st.buffer not in taken
                      and REDUCTION_VAR in st.index.free_symbols
                      and dtypes[st.buffer] == e.dtype and e in _subexpressions(st.value)), None)
        if store is not None:
            taken.add(store.buffer)
            cache[e] = (level, f"{store.buffer}[{index_source(store.index)}]", None)
            continue
        cost = int(size) * compute_dtype(e.dtype).itemsize if static else ROW_CACHE_BYTES + 1
        if cost <= budget:
            budget -= cost
            cache[e] = (level, f"row_cache{k}[r]",
                        f"{compute_type(e.dtype)} row_cache{k}[{index_source(size)}];")
    return cache


def _subexpressions(expr: Expr) -> list[Expr]:
    """`expr` and everything under it, not looking inside finished reductions."""
    out, stack = [], [expr]
    while stack:
        e = stack.pop()
        out.append(e)
        if isinstance(e, Op):
            stack.extend(e.args)
    return out


def _costly(expr: Op) -> bool:
    return any(isinstance(e, Op) and e.op in _EXPENSIVE for e in _subexpressions(expr))


@dataclasses.dataclass
class _Acc:
    """How one reduction kind accumulates: per-lane state, the step, and the final merge."""

    red: Reduction
    name: str

    @property
    def t(self) -> str:
        return compute_type(self.red.dtype)

    def init(self) -> str:
        kind, t = self.red.kind, self.t
        if kind in ("sum", "welford"):
            return f"{t}(0)"
        if kind == "prod":
            return f"{t}(1)"
        if kind in ("max", "argmax"):
            return (f"-std::numeric_limits<{t}>::infinity()" if self.red.dtype.is_floating_point
                    else f"std::numeric_limits<{t}>::lowest()")
        return (f"std::numeric_limits<{t}>::infinity()" if self.red.dtype.is_floating_point
                else f"std::numeric_limits<{t}>::max()")


def _next_row_prefetch(reds: list[Reduction], n_outer: int, width: int, r0: str) -> list[str]:
    """Prefetches, for the first pass over a row, of the same place in the next row. A row is
    read once from memory and then reread from L1 by later passes that compute (softmax's exp,
    layer norm's scaling); fetching the next row meanwhile overlaps the two instead of stalling
    the first pass on memory (softmax: 15% faster). Prefetches never fault, so the last row's
    are harmless."""
    if n_outer == 0:
        return []
    row_var = outer_var(n_outer - 1)
    lines = []
    loads = dict.fromkeys(e for r in reds for e in _subexpressions(r.value)
                          if isinstance(e, Load))
    for load in loads:
        index = load.index
        if index.coeff(REDUCTION_VAR) != 1 or row_var not in index.free_symbols:
            continue  # not contiguous along the row, or the same data for every row
        ahead = index.subs(row_var, row_var + 1)
        for line in range(0, width, CACHE_LINE // load.dtype.itemsize):
            at = index_source(ahead.subs(REDUCTION_VAR, sympy.Symbol(r0, integer=True) + line))
            lines.append(f"__builtin_prefetch(&{load.buffer}[{at}]);")
    return lines


def _reduction_loop(reds: list[Reduction], rsize: str, known: dict, counter: list[int],
                    saves: dict[Expr, str], prefetch_rows: int = 0) -> list[str]:
    accs = [_Acc(r, f"acc{counter[0] + k}") for k, r in enumerate(reds)]
    counter[0] += len(reds)
    r0 = f"{accs[0].name}_r0"  # where the vector loop stopped and the scalar tail starts
    width = min(lanes(r.dtype) for r in reds)
    ind = "    "
    lines = [f"{ind}// reduction loop: {', '.join(r.kind for r in reds)}"]
    for a in accs:
        lines += _lane_state(a, width, ind)
    lines += [f"{ind}int64_t {r0} = 0;",
              f"{ind}for (; {r0} + {width} <= {rsize}; {r0} += {width}) {{"]
    if any(a.red.kind == "welford" for a in accs):
        lines.append(f"{ind}  const float inv_n = 1.0f / float({r0} / {width} + 1);")
    lines += [f"{ind}  {p}" for p in _next_row_prefetch(reds, prefetch_rows, width, r0)]
    lines += [f"{ind}  #pragma omp simd", f"{ind}  for (int64_t l = 0; l < {width}; ++l) {{",
              f"{ind}    const int64_t r = {r0} + l;"]
    body = _Body(ind + "    ", known)
    for a in accs:
        v = body.value(a.red.value, counter)
        body.lines += _step(a, v, "[l]", "r", ind + "    ")
    body.lines += [f"{ind}    {where} = {body.value(e, counter)};" for e, where in saves.items()]
    lines += body.lines + [f"{ind}  }}", f"{ind}}}"]
    for a in accs:
        lines += _tail_state(a, ind)
    lines += [f"{ind}for (int64_t r = {r0}; r < {rsize}; ++r) {{"]
    tail = _Body(ind + "  ", known)
    if any(a.red.kind == "welford" for a in accs):
        tail.lines.append(f"{ind}  const float inv_n = 1.0f / float(r - {r0} + 1);")
    for a in accs:
        v = tail.value(a.red.value, counter)
        tail.lines += _step(a, v, "_t", "r", ind + "  ")
    tail.lines += [f"{ind}  {where} = {tail.value(e, counter)};" for e, where in saves.items()]
    lines += tail.lines + [f"{ind}}}"]
    for a in accs:
        lines += _finish(a, width, rsize, r0, ind, known)
    return lines


def _lane_state(a: _Acc, width: int, ind: str) -> list[str]:
    n, t = a.name, a.t
    if a.red.kind == "welford":
        return [f"{ind}{t} {n}_mean[{width}] = {{}}, {n}_m2[{width}] = {{}};"]
    lines = [f"{ind}{t} {n}[{width}];", f"{ind}for (int l = 0; l < {width}; ++l) "
             f"{n}[l] = {a.init()};"]
    if a.red.kind in ("argmax", "argmin"):
        lines.append(f"{ind}int64_t {n}_idx[{width}] = {{}};")
    return lines


def _tail_state(a: _Acc, ind: str) -> list[str]:
    n, t = a.name, a.t
    if a.red.kind == "welford":
        return [f"{ind}{t} {n}_mean_t = 0, {n}_m2_t = 0;"]
    lines = [f"{ind}{t} {n}_t = {a.init()};"]
    if a.red.kind in ("argmax", "argmin"):
        lines.append(f"{ind}int64_t {n}_idx_t = 0;")
    return lines


def _step(a: _Acc, v: str, lane: str, r: str, ind: str) -> list[str]:
    n, kind = a.name, a.red.kind
    # lane is "[l]" (vector lanes) or "_t" (the scalar tail)
    acc = f"{n}{lane}" if lane == "[l]" else f"{n}_t"
    if kind == "sum":
        return [f"{ind}{acc} = {acc} + {v};"]
    if kind == "prod":
        return [f"{ind}{acc} = {acc} * {v};"]
    if kind in ("max", "min"):
        return [f"{ind}{acc} = jo_{kind}<{a.t}>({acc}, {v});"]
    if kind in ("argmax", "argmin"):
        idx = f"{n}_idx{lane}" if lane == "[l]" else f"{n}_idx_t"
        return [f"{ind}{{ const bool take = jo_{kind}_take<{a.t}>({acc}, {v});",
                f"{ind}  {acc} = take ? {v} : {acc}; {idx} = take ? {r} : {idx}; }}"]
    mean = f"{n}_mean{lane}" if lane == "[l]" else f"{n}_mean_t"
    m2 = f"{n}_m2{lane}" if lane == "[l]" else f"{n}_m2_t"
    return [f"{ind}{{ const {a.t} delta = {v} - {mean};",
            f"{ind}  {mean} = {mean} + delta * inv_n;",
            f"{ind}  {m2} = {m2} + delta * ({v} - {mean}); }}"]


def _finish(a: _Acc, width: int, rsize: str, r0: str, ind: str, known: dict) -> list[str]:
    """Merge the lanes and the tail, in index order, into the reduction's result names."""
    n, t, kind = a.name, a.t, a.red.kind
    if kind == "welford":
        lines = [f"{ind}{t} {n}_mean_all = 0, {n}_m2_all = 0; int64_t {n}_count = 0;",
                 f"{ind}for (int l = 0; l < {width} && {r0} > 0; ++l)",
                 f"{ind}  jo_welford_merge({n}_mean_all, {n}_m2_all, {n}_count, {n}_mean[l], "
                 f"{n}_m2[l], {r0} / {width});",
                 f"{ind}jo_welford_merge({n}_mean_all, {n}_m2_all, {n}_count, {n}_mean_t, "
                 f"{n}_m2_t, {rsize} - {r0});"]
        known[_result(a.red, 0)] = f"{n}_mean_all"
        known[_result(a.red, 1)] = f"{n}_m2_all"
        return lines
    if kind in ("argmax", "argmin"):
        better = f"jo_{kind}_better<{t}>"
        lines = [f"{ind}{t} {n}_best = {n}_t; int64_t {n}_arg = {n}_idx_t;",
                 f"{ind}for (int l = 0; l < {width}; ++l)",
                 f"{ind}  if ({better}({n}_best, {n}_arg, {n}[l], {n}_idx[l])) "
                 f"{{ {n}_best = {n}[l]; {n}_arg = {n}_idx[l]; }}"]
        known[_result(a.red, 0)] = f"{n}_arg"
        return lines
    op = {"sum": "{x} + {y}", "prod": "{x} * {y}", "max": "jo_max<T>({x}, {y})",
          "min": "jo_min<T>({x}, {y})"}[kind].replace("T", t)
    lines = [f"{ind}{t} {n}_all = {n}_t;",
             f"{ind}for (int l = 0; l < {width}; ++l) "
             f"{n}_all = {op.format(x=f'{n}_all', y=f'{n}[l]')};"]
    known[_result(a.red, 0)] = f"{n}_all"
    return lines


def _result(red: Reduction, output: int) -> ReductionResult:
    dtype = torch.int64 if red.kind in ("argmax", "argmin") else red.dtype
    return ReductionResult(red, output, dtype)


WELFORD_PRELUDE = r"""
// Chan et al.'s pairwise merge of (mean, m2, count) partial Welford states.
template <typename T>
static inline void jo_welford_merge(T& mean, T& m2, int64_t& count, T mean_b, T m2_b,
                                    int64_t count_b) {
  if (count_b == 0) return;
  const int64_t total = count + count_b;
  const T delta = mean_b - mean;
  const T weight = T(count_b) / T(total);
  mean = mean + delta * weight;
  m2 = m2 + m2_b + delta * delta * T(count) * weight;
  count = total;
}
"""


def render_source(kernels: list[Kernel]) -> str:
    """One translation unit holding every kernel of a graph (one compiler run for all)."""
    parts = [PRELUDE.strip(), WELFORD_PRELUDE.strip()]
    parts += [render_kernel(k) for k in kernels]
    return "\n\n".join(parts) + "\n"
