"""OpInfo-style numerics sweep of the generated C++ kernels against eager.

Every overload the fusion tables claim (passes/fusible_ops.py: all of POINTWISE and REDUCTIONS,
and representative VIEWS feeding a pointwise op) is compiled with
torch.compile(backend="jitopt") for float32, bfloat16, float16, int64 and bool, and its outputs
are compared with eager's. Each op runs in several variants: contiguous, transposed and
step-sliced inputs, broadcasting (rows, columns, 0-d), mixed-dtype promotion, Python scalars,
and sizes that end the vector loops in a tail: 0-d, 1, 7 x 33, 1000 and 40001 elements (the
last past PARALLEL_THRESHOLD: the OpenMP path), reduction rows of 1, 7, 33 and 1000. Float
inputs hold nan, +-inf, -0.0, rounding ties and 0.1 (no half-type value); reduction rows hold
ties and NaNs for argmax/argmin.

Each test also proves its op ran in a generated kernel: the overload is in the graph that was
partitioned, no partition fell back to ATen, no ATen op was left inline, and
counters["targets"]["cpp_partitions"] > 0.

Speed: the ops of one family (pointwise, reductions, views) run as one compiled function per
dtype: one trace and one g++ run (ops over the same loop space share a kernel), and each op's
test reads its own outputs. When that shared compile fails or leaves anything on ATen, each op
of the family is compiled alone, so a failure is reported against the op that caused it. Ops in
EXPECTED_FAILURES always compile alone, so their strict xfail checks exactly them.

A combination eager rejects (bitwise ops on floats, `-` on bools) is skipped; a variant eager
rejects (an integer divided by zero, a float alpha for an integer add) is left out of its op.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.fx as fx

import jitopt
from jitopt.codegen.targets import TARGETS
from jitopt.passes.fusible_ops import POINTWISE, REDUCTIONS, VIEWS
from jitopt.report import recording

aten = torch.ops.aten
f32, bf16, f16, i64 = torch.float32, torch.bfloat16, torch.float16, torch.int64
DTYPES = (f32, bf16, f16, i64, torch.bool)
DTYPE_IDS = {f32: "float32", bf16: "bfloat16", f16: "float16", i64: "int64", torch.bool: "bool"}

# Tolerances, by the dtype of the output. float32, float64 and the exact dtypes (ints, bool)
# use assert_close's defaults (exact for ints and bools). Half types: a fused kernel computes
# in float32 and rounds once at the store, as eager does for a single op on CPU and as
# Inductor does; the float32 values may still differ by a few float32 ulp (glibc's libmvec
# against eager's Sleef or scalar libm, FMA contraction, summation order), which can move
# that one final rounding by at most one ulp of the half type: 2**-7 relative for bfloat16
# (7 stored mantissa bits) and 2**-10 for float16. atol covers results that round to zero.
HALF_TOLERANCE = {bf16: dict(rtol=2 ** -7, atol=1e-5), f16: dict(rtol=2 ** -10, atol=1e-5)}

# --- inputs --------------------------------------------------------------------------------

M, N, V = 7, 33, 1000  # 7 x 33 = 231 elements and 1000: neither a multiple of a vector
BIG = 40001  # past the kernels' PARALLEL_THRESHOLD: the OpenMP path, several chunks and a tail
# Reduction row length -> number of rows (37 x 1000 is past PARALLEL_THRESHOLD: OpenMP rows).
ROWS = {1: 5, 7: 4, 33: 3, 1000: 37}
NAN, INF = float("nan"), float("inf")
# nan, infinities, signed zeros, rounding ties (0.5, 1.5, 2.5, -2.5: round-half-even), +-1.
# 0.1 is not a half-type value: comparing it with the Python scalar 0.1 tests that scalar's
# rounding.
SPECIALS = (NAN, INF, -INF, -0.0, 0.0, 0.5, -0.5, 1.5, 2.5, -2.5, 1.0, -1.0, 3.0, 1e-3, -7.25,
            0.1, -0.1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _values(shape, dtype, g, kind="any") -> torch.Tensor:
    """Pointwise operands. kind: "any" (ints include 0), "nonzero" (an integer divisor),
    "big" (numerators beyond float precision: int64 past 2**53, floats near 1e4)."""
    numel = math.prod(shape)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    if not dtype.is_floating_point:
        if kind == "big":
            t = torch.randint(-2 ** 62, 2 ** 62, shape, generator=g)
            flat = t.view(-1)
            flat[:4] = torch.tensor([2 ** 53 + 1, -(2 ** 53) - 3, 2 ** 62 + 7, -7])[:numel]
            return t
        if kind == "nonzero":
            sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
            return torch.randint(1, 7, shape, generator=g) * sign
        return torch.randint(-9, 10, shape, generator=g)
    t = torch.randn(shape, generator=g) * (1e4 if kind == "big" else 2.0)
    if numel > 1:  # single elements stay ordinary; the specials go in the larger tensors
        where = torch.randperm(numel, generator=g)[:len(SPECIALS)]
        t.view(-1)[where] = torch.tensor(SPECIALS[:len(where)])
    elif numel == 1:
        t.fill_(-1.75)
    return t.to(dtype)


def _transposed(shape, dtype, g, kind="any") -> torch.Tensor:
    """A non-contiguous input: the transpose of a contiguous tensor."""
    return _values(shape[::-1], dtype, g, kind).t()


def _sliced(shape, dtype, g) -> torch.Tensor:
    """A non-contiguous input: every other column of a wider tensor."""
    return _values((shape[0], shape[1] * 2), dtype, g)[:, ::2]


def _row_values(rows, n, dtype, g, kind="any") -> torch.Tensor:
    """Reduction rows. Floats are quarter-integers, so sums are exact in any order and a wrong
    result is a bug, not rounding; ties for argmax/argmin are guaranteed; specials sit in
    their own rows: row 0 a NaN (two in long rows: the first one wins), row 1 +inf, row 2 a
    -inf (a masked softmax row). kind "prod": +-1 with up to 5 each of 2 and 0.5, so every
    partial product, in any order, is exact and within float16's range; "wide": any number of
    2 and 0.5 (partial products beyond float16's range)."""
    if dtype == torch.bool:
        return torch.rand(rows, n, generator=g) < 0.7
    if kind in ("prod", "wide"):
        choice = torch.tensor([1.0, -1.0, 2.0, 0.5, 1.0, 1.0, -1.0, 1.0])
        t = choice[torch.randint(0, len(choice), (rows, n), generator=g)]
        if kind == "prod":
            t = torch.where(t.abs() == 1, t, torch.sign(torch.randn(rows, n, generator=g)))
            for r in range(rows):
                where = torch.randperm(n, generator=g)[:10]
                t[r, where[:5]], t[r, where[5:]] = 2.0, 0.5
        if not dtype.is_floating_point:
            t = t.clamp(min=-1).round()  # 0.5 would not be an integer: -1, 1 and 2
        return t.to(dtype)
    t = torch.randint(-40, 41, (rows, n), generator=g).to(torch.float32) / 4
    if not dtype.is_floating_point:
        t = (t * 4).round()
    if n > 2:  # a tie for the largest and for the smallest value in every row
        hi, lo = t.amax(-1), t.amin(-1)
        t[:, n // 3], t[:, n - 1] = hi, hi
        t[:, 1], t[:, n // 2] = lo, lo
    if dtype.is_floating_point and rows >= 3:
        t[0, n // 2] = NAN
        if n > 8:
            t[0, n - 2] = NAN
        t[1, 0] = INF
        t[2, n - 1] = -INF
        t[rows - 1, 0] = -0.0
    return t.to(dtype)


def _finite(t: torch.Tensor) -> torch.Tensor:
    """`t` with +-inf replaced by +-9 (NaN stays), in `t`'s layout."""
    if not t.dtype.is_floating_point:
        return t
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
    return out.copy_(torch.nan_to_num(t, nan=NAN, posinf=9.0, neginf=-9.0))


def make_inputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor a family's program reads, by name. Deterministic per dtype."""
    g = _gen(1234 + DTYPES.index(dtype))
    other = f32 if dtype in (i64, torch.bool) else i64  # a second dtype, for type promotion
    other_kind = "any" if other == f32 else "nonzero"
    t = {
        "x": _values((M, N), dtype, g),
        "y": _values((M, N), dtype, g, "nonzero"),
        "xt": _transposed((M, N), dtype, g),
        "xs": _sliced((M, N), dtype, g),
        "yrow": _values((N,), dtype, g, "nonzero"),
        "ycol": _values((M, 1), dtype, g, "nonzero"),
        "v": _values((V,), dtype, g),
        "w": _values((V,), dtype, g, "nonzero"),
        "s": _values((1,), dtype, g),
        "vbig": _values((BIG,), dtype, g),
        "wbig": _values((BIG,), dtype, g, "nonzero"),
        "z0": _values((), dtype, g, "nonzero").abs() if dtype != torch.bool else torch.tensor(True),
        "big": _values((M, N), dtype, g, "big"),
        "mixed": _values((M, N), other, g, other_kind),
        "mask": torch.rand((M, N), generator=g) < 0.5,
        "maskrow": torch.rand((N,), generator=g) < 0.5,
        # views
        "cube": _values((3, M, N), dtype, g),
        "yt": _values((N, M), dtype, g, "nonzero"),
        "row1": _values((1, N), dtype, g, "nonzero"),
        "wide": _values((M, 2 * N + 3), dtype, g),
        "tall": _values((M + 4, N), dtype, g),
        "mid": _values((M, 3, N), dtype, g),
        "y3": _values((M, 1, N), dtype, g, "nonzero"),
        "ym": _values((M,), dtype, g, "nonzero"),
        "square": _values((N, N), dtype, g),
        "cube7": _values((M, M, M), dtype, g),
    }
    for n, rows in ROWS.items():
        t[f"r{n}"] = _row_values(rows, n, dtype, g)
        t[f"p{n}"] = _row_values(rows, n, dtype, g, "prod")
        t[f"pw{n}"] = _row_values(rows, n, dtype, g, "wide")
        t[f"v{n}"] = _row_values(1, n, dtype, g)[0]
        t[f"vp{n}"] = _row_values(1, n, dtype, g, "prod")[0]
        t[f"lw{n}"] = _finite(_values((n,), dtype, g))
        t[f"lb{n}"] = _finite(_values((n,), dtype, g))
    t["rt"] = _row_values(N, 6, dtype, g).t()  # rows of 33 read with stride 6 (non-contiguous)
    # Where eager's answer for an infinity is an artifact (see EXPECTED_FAILURES), the main
    # test reads these, and a separate "-inf" entry keeps the infinity case on record.
    for name in ("x", "xt", "xs", "v", "vbig"):
        t[name + "fin"] = _finite(t[name])
    for n in ROWS:
        t[f"rf{n}"] = _finite(t[f"r{n}"])
    return t


# --- the ops -------------------------------------------------------------------------------

Variant = tuple[str, Callable[[dict], torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class Op:
    name: str  # the test id and the EXPECTED_FAILURES key
    overload: torch._ops.OpOverload  # the table entry under test
    variants: tuple[Variant, ...]
    tolerance: dict = dataclasses.field(default_factory=dict)  # dtype -> assert_close kwargs

    def __repr__(self) -> str:
        return self.name


def _name(overload) -> str:
    return f"{overload.overloadpacket.__name__}.{overload._overloadname}"


def unary(fn, finite: bool = False) -> list[Variant]:
    """fn on every layout; `finite`: on the inputs without infinities."""
    f = "fin" if finite else ""
    return [("contiguous", lambda t: fn(t["x" + f])), ("transposed", lambda t: fn(t["xt" + f])),
            ("sliced", lambda t: fn(t["xs" + f])), ("n=1000", lambda t: fn(t["v" + f])),
            (f"n={BIG}", lambda t: fn(t["vbig" + f])),
            ("n=1", lambda t: fn(t["s"])), ("0-d", lambda t: fn(t["z0"]))]


def binary(fn, big: bool = False) -> list[Variant]:
    out = [("same shape", lambda t: fn(t["x"], t["y"])),
           ("transposed, row broadcast", lambda t: fn(t["xt"], t["yrow"])),
           ("sliced, column broadcast", lambda t: fn(t["xs"], t["ycol"])),
           ("column broadcast on the left", lambda t: fn(t["ycol"], t["y"])),
           ("n=1000", lambda t: fn(t["v"], t["w"])),
           (f"n={BIG}", lambda t: fn(t["vbig"], t["wbig"])),
           ("n=1 broadcast", lambda t: fn(t["x"], t["s"])),
           ("0-d", lambda t: fn(t["x"], t["z0"])),
           ("python scalar 0.1", lambda t: fn(t["x"], 0.1)),
           ("mixed dtypes", lambda t: fn(t["x"], t["mixed"])),
           ("mixed dtypes reversed", lambda t: fn(t["mixed"], t["y"]))]
    if big:
        out.append(("big numerator", lambda t: fn(t["big"], t["y"])))
    return out


def with_scalars(fn, scalars) -> list[Variant]:
    """fn(tensor, scalar) on several layouts, once per scalar."""
    layouts = (("contiguous", "x"), ("transposed", "xt"), ("n=1000", "v"), ("n=1", "s"))
    return [(f"{where} {s!r}", lambda t, s=s, k=k: fn(t[k], s))
            for s in scalars for where, k in layouts]


def op(overload, variants, suffix: str = "", tolerance=None) -> Op:
    return Op(_name(overload) + suffix, overload, tuple(variants), tolerance or {})


UNARY_NAMES = ("neg", "abs", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt",
               "rsqrt", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "tanh",
               "asinh", "acosh", "atanh", "erf", "erfc", "sigmoid", "reciprocal", "floor",
               "ceil", "round", "trunc", "sign", "bitwise_not", "frac", "relu", "silu",
               "logical_not", "isnan", "isinf", "signbit")

BINARY = (aten.mul.Tensor, aten.div.Tensor, aten.maximum.default, aten.minimum.default,
          aten.atan2.default, aten.remainder.Tensor, aten.fmod.Tensor, aten.bitwise_and.Tensor,
          aten.bitwise_or.Tensor, aten.bitwise_xor.Tensor, aten.copysign.Tensor,
          aten.hypot.default, aten.pow.Tensor_Tensor, aten.logical_and.default,
          aten.logical_or.default, aten.logical_xor.default,
          *(getattr(aten, n).Tensor for n in ("eq", "ne", "lt", "le", "gt", "ge")))
DIVIDING = {aten.div.Tensor, aten.remainder.Tensor, aten.fmod.Tensor}


def _pointwise_ops() -> list[Op]:
    ops = [op(getattr(aten, n).default, unary(getattr(aten, n).default)) for n in UNARY_NAMES]
    ops += [op(o, binary(o, big=o in DIVIDING)) for o in BINARY]
    for o in (aten.add.Tensor, aten.sub.Tensor, aten.rsub.Tensor):
        ops.append(op(o, binary(o) + [
            ("alpha=2", lambda t, o=o: o(t["x"], t["y"], alpha=2)),
            ("alpha=-0.5, row broadcast", lambda t, o=o: o(t["xt"], t["yrow"], alpha=-0.5))]))
    for mode in ("floor", "trunc", None):  # one entry each: they fail apart
        ops.append(op(aten.div.Tensor_mode, binary(
            lambda a, b, mode=mode: aten.div.Tensor_mode(a, b, rounding_mode=mode), big=True),
            f"-{mode}"))
    for o, scalars in [
            (aten.add.Scalar, (3, -2.5, 0.1)), (aten.sub.Scalar, (3, -2.5, 0.1)),
            (aten.rsub.Scalar, (3, -2.5, 0.1)), (aten.mul.Scalar, (3, -2.5, 0.1, True)),
            (aten.div.Scalar, (3, -2.5, 0.1)), (aten.remainder.Scalar, (3, -2.5, 0.1)),
            (aten.fmod.Scalar, (3, -2.5, 0.1)), (aten.bitwise_and.Scalar, (6, -3, True)),
            (aten.bitwise_or.Scalar, (6, -3, True)), (aten.bitwise_xor.Scalar, (6, -3, True)),
            (aten.pow.Tensor_Scalar, (2, 3, 0.5, -0.5, -1, -2, 2.5, 0, 0.1)),
            *[(getattr(aten, n).Scalar, (0, 2, 0.1, -2.5))
              for n in ("eq", "ne", "lt", "le", "gt", "ge")]]:
        ops.append(op(o, with_scalars(o, scalars)))
    ops.append(op(aten.add.Scalar, with_scalars(
        lambda a, s: aten.add.Scalar(a, s, alpha=2), (3,)), "-alpha"))
    for mode in ("floor", "trunc"):
        ops.append(op(aten.div.Scalar_mode, with_scalars(
            lambda a, s, mode=mode: aten.div.Scalar_mode(a, s, rounding_mode=mode), (3, -2.5))
            + [("big numerator", lambda t, mode=mode: aten.div.Scalar_mode(
                t["big"], 3, rounding_mode=mode))], f"-{mode}"))
    ops.append(op(aten.pow.Scalar, [
        (f"{base!r} ** {name}", lambda t, k=k, base=base: aten.pow.Scalar(base, t[k]))
        for base in (2, 0.5, -2.0, 0.1) for name, k in (("contiguous", "x"), ("transposed", "xt"),
                                                   ("n=1000", "v"))]))
    ops.append(op(aten.gelu.default, unary(aten.gelu.default, finite=True) + [
        ("tanh", lambda t: aten.gelu.default(t["x"], approximate="tanh")),
        ("tanh, n=1000", lambda t: aten.gelu.default(t["v"], approximate="tanh"))]))
    ops.append(op(aten.gelu.default, unary(aten.gelu.default)[:4], "-inf"))
    ops.append(op(aten.clamp.default, [
        ("-1..1", lambda t: aten.clamp.default(t["x"], -1, 1)),
        ("-1..1 transposed", lambda t: aten.clamp.default(t["xt"], -1, 1)),
        ("min only", lambda t: aten.clamp.default(t["v"], 0.5)),
        ("max only", lambda t: aten.clamp.default(t["x"], None, -0.5)),
        ("min > max", lambda t: aten.clamp.default(t["x"], 1, -1)),
        ("float bounds", lambda t: aten.clamp.default(t["x"], -2.5, 3.5)),
        ("F.hardtanh", lambda t: torch.nn.functional.hardtanh(t["xs"]))]))
    ops.append(op(aten.clamp_min.default, [
        ("0", lambda t: aten.clamp_min.default(t["x"], 0)),
        ("-1.5 n=1000", lambda t: aten.clamp_min.default(t["v"], -1.5))]))
    ops.append(op(aten.clamp_max.default, [
        ("0", lambda t: aten.clamp_max.default(t["x"], 0)),
        ("2.5 transposed", lambda t: aten.clamp_max.default(t["xt"], 2.5))]))
    ops.append(op(aten.leaky_relu.default, unary(aten.leaky_relu.default) + [
        ("slope 0.2", lambda t: aten.leaky_relu.default(t["x"], 0.2))]))
    ops.append(op(aten.elu.default, unary(aten.elu.default) + [
        ("alpha 0.5", lambda t: aten.elu.default(t["x"], 0.5)),
        ("selu", lambda t: torch.nn.functional.selu(t["xt"])),
        ("alpha, scale, input_scale", lambda t: aten.elu.default(t["v"], 2.0, 1.5, 0.5))]))
    ops.append(op(aten.where.self, [
        ("same shape", lambda t: aten.where.self(t["mask"], t["x"], t["y"])),
        ("broadcast", lambda t: aten.where.self(t["maskrow"], t["xt"], t["ycol"])),
        ("scalar branch", lambda t: torch.where(t["mask"], t["x"], 2.5)),
        ("mixed dtypes", lambda t: aten.where.self(t["mask"], t["x"], t["mixed"]))]))
    ops.append(op(aten.masked_fill.Scalar, [
        ("3", lambda t: aten.masked_fill.Scalar(t["x"], t["mask"], 3)),
        ("-1.5 transposed", lambda t: aten.masked_fill.Scalar(t["xt"], t["mask"], -1.5)),
        ("True, row mask", lambda t: aten.masked_fill.Scalar(t["x"], t["maskrow"], True))]))
    ops.append(op(aten.masked_fill.Tensor, [
        ("0-d value", lambda t: aten.masked_fill.Tensor(t["x"], t["mask"], t["z0"])),
        ("0-d value, transposed", lambda t: aten.masked_fill.Tensor(t["xt"], t["mask"], t["z0"]))
    ]))
    ops.append(op(aten._to_copy.default, [
        (f"{where} to {DTYPE_IDS[d]}", lambda t, k=k, d=d: aten._to_copy.default(t[k], dtype=d))
        for d in DTYPES for where, k in (("contiguous", "x"), ("transposed", "xt"),
                                         ("n=1000", "v"))]))
    ops.append(op(aten.clone.default, [
        ("output", lambda t: aten.clone.default(t["x"])),
        ("transposed to contiguous", lambda t: aten.clone.default(
            t["xt"], memory_format=torch.contiguous_format))]))
    ops.append(op(aten.alias.default, [
        ("of a product", lambda t: aten.alias.default(aten.mul.Tensor(t["x"], t["y"])))]))
    ops.append(op(aten.full.default, [
        ("alone", lambda t: aten.full.default([M, N], _fill(t["x"].dtype), dtype=t["x"].dtype)),
        ("feeding mul", lambda t: aten.mul.Tensor(aten.full.default(
            [M, N], _fill(t["x"].dtype), dtype=t["x"].dtype), t["x"]))]))
    ops.append(op(aten.scalar_tensor.default, [
        ("alone", lambda t: aten.scalar_tensor.default(_fill(t["x"].dtype), dtype=t["x"].dtype)),
        ("feeding mul", lambda t: aten.mul.Tensor(aten.scalar_tensor.default(
            _fill(t["x"].dtype), dtype=t["x"].dtype), t["x"]))]))
    ops.append(op(aten.arange.start_step, [
        ("0..33", lambda t: aten.arange.start_step(0, N, 1, dtype=t["x"].dtype)),
        ("5..-28 step -1", lambda t: aten.arange.start_step(5, 5 - N, -1, dtype=t["x"].dtype)),
        ("step 3, feeding mul", lambda t: aten.mul.Tensor(
            aten.arange.start_step(-4, 3 * N - 4, 3, dtype=t["x"].dtype), t["x"]))]))
    return ops


def _fill(dtype):
    return True if dtype == torch.bool else 7 if not dtype.is_floating_point else -2.5


def _reduction_ops() -> list[Op]:
    lengths = tuple(ROWS)

    def rows(fn, source="r", keepdim_at=(7, 1000)):
        out = [(f"rows of {n}", lambda t, n=n: fn(t[f"{source}{n}"], False)) for n in lengths]
        out += [(f"rows of {n}, keepdim", lambda t, n=n: fn(t[f"{source}{n}"], True))
                for n in keepdim_at]
        if source == "r":
            out.append(("transposed rows of 33", lambda t: fn(t["rt"], False)))
        return out

    def layer_norm(source):
        return [(f"rows of {n}{', affine' if affine else ''}", lambda t, n=n, affine=affine:
                 aten.native_layer_norm.default(
                     t[f"{source}{n}"], [n], t[f"lw{n}"] if affine else None,
                     t[f"lb{n}"] if affine else None, 1e-5))
                for n in lengths for affine in (False, True)]

    def whole(fn, source="v"):
        return [(f"n={n}", lambda t, n=n: fn(t[f"{source}{n}"])) for n in lengths]

    ops = [
        op(aten.sum.dim_IntList, rows(lambda a, k: aten.sum.dim_IntList(a, [-1], k)) + [
            ("dtype=float32", lambda t: aten.sum.dim_IntList(t["r33"], [1], dtype=f32))]),
        op(aten.sum.default, whole(aten.sum.default)),
        op(aten.mean.dim, rows(lambda a, k: aten.mean.dim(a, [-1], k))),
        op(aten.mean.default, whole(aten.mean.default)),
        op(aten.prod.dim_int, rows(lambda a, k: aten.prod.dim_int(a, -1, k), "p")),
        op(aten.prod.dim_int, rows(lambda a, k: aten.prod.dim_int(a, -1, k), "pw"), "-wide"),
        op(aten.prod.default, whole(aten.prod.default, "vp")),
        op(aten.amax.default, rows(lambda a, k: aten.amax.default(a, [-1], k))),
        op(aten.amin.default, rows(lambda a, k: aten.amin.default(a, [1], k))),
        op(aten.argmax.default, rows(lambda a, k: aten.argmax.default(a, -1, k))
           + whole(aten.argmax.default)),
        op(aten.argmin.default, rows(lambda a, k: aten.argmin.default(a, -1, k))
           + whole(aten.argmin.default)),
        op(aten.var.correction, [
            (f"correction={c}: {name}", fn) for c in (None, 0, 2) for name, fn in rows(
                lambda a, k, c=c: aten.var.correction(a, [-1], correction=c, keepdim=k))]),
        op(aten.std.correction, [
            (f"correction={c}: {name}", fn) for c in (None, 0) for name, fn in rows(
                lambda a, k, c=c: aten.std.correction(a, [-1], correction=c, keepdim=k))]),
        op(aten._softmax.default, rows(lambda a, k: aten._softmax.default(a, -1, False), "r",
                                       ())),
        # Eager's half-type log_softmax rounds each row's sum(exp(x - max)) to the half type
        # before its log (bfloat16: log(1.0281) came out as log(1.03125)), the kernel keeps it
        # in float32 (correctly rounded against float64): eager is off by up to log(1 + 2**-8)
        # absolute for bfloat16, log(1 + 2**-11) for float16.
        op(aten._log_softmax.default, rows(lambda a, k: aten._log_softmax.default(a, -1, False),
                                           "r", ()),
           tolerance={bf16: dict(rtol=2 ** -7, atol=2 ** -8), f16: dict(rtol=2 ** -10,
                                                                        atol=2 ** -11)}),
        # Normalized outputs are O(1), so one ulp of 1.0 is their absolute scale in half types:
        # eager computes x * rstd - mean * rstd, whose cancellation leaves ~|x| * rstd * 2**-24
        # (rstd = 1 / sqrt(eps) = 316 for a row of one element: eager -6.1e-05, kernel 0).
        op(aten.native_layer_norm.default, layer_norm("rf"), tolerance={
            bf16: dict(rtol=2 ** -7, atol=2 ** -7), f16: dict(rtol=2 ** -10, atol=2 ** -10)}),
        op(aten.native_layer_norm.default, layer_norm("r"), "-inf"),
    ]
    return ops


def _view_ops() -> list[Op]:
    """Each view feeds a pointwise op (mul), the only way a view is in a kernel. Of a graph
    input, a view is a strided load (lowering.py's _strided_value). Of a value computed in the
    kernel, it is the op's index remap: that happens where producer and consumer share a loop
    space (a transpose of a square, a view of a row reduction's result: the decomposed-softmax
    pattern). A slice of a computed value never does: it ends the group."""
    mul = aten.mul.Tensor

    def sq(a):
        return mul(a, a)

    def row_max(t, keepdim):  # (M, 1) or (M,): computed in the kernel, over the rows of x
        return aten.amax.default(sq(t["x"]), [-1], keepdim)

    return [
        op(aten.permute.default, [
            ("2-d", lambda t: mul(aten.permute.default(t["yt"], [1, 0]), t["x"])),
            ("3-d", lambda t: mul(aten.permute.default(t["cube"], [1, 2, 0]),
                                  aten.unsqueeze.default(t["x"], -1))),
            ("computed", lambda t: mul(aten.permute.default(sq(t["cube7"]), [1, 2, 0]),
                                       t["cube7"]))]),
        op(aten.transpose.int, [
            ("0, 1", lambda t: mul(aten.transpose.int(t["yt"], 0, 1), t["x"])),
            ("-1, -2", lambda t: mul(aten.transpose.int(t["yt"], -1, -2), t["xt"])),
            ("computed", lambda t: mul(aten.transpose.int(sq(t["square"]), 0, 1), t["square"]))]),
        op(aten.t.default, [
            ("", lambda t: mul(aten.t.default(t["yt"]), t["x"])),
            ("computed", lambda t: mul(aten.t.default(sq(t["square"])), t["square"]))]),
        op(aten.expand.default, [
            ("column", lambda t: mul(aten.expand.default(t["ycol"], [M, N]), t["x"])),
            ("new leading dims", lambda t: mul(aten.expand.default(t["yrow"], [3, M, N]),
                                               t["cube"])),
            ("computed", lambda t: mul(aten.expand.default(row_max(t, True), [M, N]), t["x"]))]),
        op(aten.unsqueeze.default, [
            ("0", lambda t: mul(aten.unsqueeze.default(t["yrow"], 0), t["x"])),
            ("-1", lambda t: mul(aten.unsqueeze.default(t["x"], -1), t["mid"])),
            ("1", lambda t: mul(aten.unsqueeze.default(t["x"], 1), t["y3"])),
            ("computed", lambda t: mul(aten.unsqueeze.default(row_max(t, False), 1), t["ycol"]))]),
        op(aten.squeeze.dim, [
            ("0", lambda t: mul(aten.squeeze.dim(t["row1"], 0), t["x"])),
            ("computed", lambda t: mul(aten.squeeze.dim(row_max(t, True), 1), t["ym"]))]),
        op(aten.squeeze.dims, [
            ("[1]", lambda t: mul(aten.squeeze.dims(t["y3"], [1]), t["x"])),
            ("computed", lambda t: mul(aten.squeeze.dims(row_max(t, True), [1]), t["ym"]))]),
        op(aten.squeeze.default, [
            ("", lambda t: mul(aten.squeeze.default(t["y3"]), t["x"])),
            ("computed", lambda t: mul(aten.squeeze.default(row_max(t, True)), t["ym"]))]),
        op(aten.view.default, [
            ("insert a 1", lambda t: mul(aten.view.default(t["yrow"], [1, N]), t["x"])),
            ("drop a 1", lambda t: mul(aten.view.default(t["y3"], [M, N]), t["xt"])),
            ("computed", lambda t: mul(aten.view.default(row_max(t, False), [M, 1]), t["ycol"]))]),
        op(aten.view.default, [  # no index remap: only a view of an input can flatten
            ("flatten", lambda t: mul(aten.view.default(t["x"], [M * N]),
                                      aten.view.default(t["y"], [M * N])))], "-flatten"),
        op(aten._unsafe_view.default, [
            ("insert a 1", lambda t: mul(aten._unsafe_view.default(t["yrow"], [1, N]), t["x"])),
            ("computed", lambda t: mul(aten._unsafe_view.default(row_max(t, True), [M]),
                                       t["ym"]))]),
        op(aten.slice.Tensor, [
            ("columns 3:3+N", lambda t: mul(aten.slice.Tensor(t["wide"], 1, 3, 3 + N), t["x"])),
            ("columns 1::2", lambda t: mul(aten.slice.Tensor(t["wide"], 1, 1, 2 * N + 1, 2),
                                           t["x"])),
            ("last N columns", lambda t: mul(aten.slice.Tensor(t["wide"], 1, -N), t["xt"])),
            ("rows 2:2+M", lambda t: mul(aten.slice.Tensor(t["tall"], 0, 2, 2 + M), t["x"]))]),
        op(aten.select.int, [
            ("dim 0, index 1", lambda t: mul(aten.select.int(t["cube"], 0, 1), t["x"])),
            ("dim 0, index -1", lambda t: mul(aten.select.int(t["cube"], 0, -1), t["xt"])),
            ("middle dim, index 2", lambda t: mul(aten.select.int(t["mid"], 1, 2), t["x"])),
            ("computed, index -1", lambda t: mul(aten.select.int(row_max(t, True), 1, -1),
                                                 t["ym"]))]),
    ]


FAMILIES: dict[str, list[Op]] = {
    "pointwise": _pointwise_ops(), "reduction": _reduction_ops(), "view": _view_ops()}

# Overloads no torch.compile graph holds: Dynamo and AOTAutograd decompose them first
# (CompositeImplicitAutograd ops, capture's DECOMPOSITIONS, lift_fresh_copy of a constant that
# fold_constants folds, aten.reshape becoming view). They are lowered directly, from a
# one-node ATen graph, with args built from a family's inputs.
DIRECT: dict[torch._ops.OpOverload, Callable[[dict], tuple]] = {
    aten.square.default: lambda t: (t["x"],),
    aten.hardtanh.default: lambda t: (t["x"], -0.5, 2.0),
    aten.where.ScalarSelf: lambda t: (t["mask"], 2.5, t["x"]),
    aten.where.ScalarOther: lambda t: (t["mask"], t["xt"], -1),
    aten.where.Scalar: lambda t: (t["mask"], 2.5, -1),
    aten.reshape.default: lambda t: (t["xt"], [M, 1, N]),
    aten.lift_fresh_copy.default: lambda t: (t["xt"],),
}

# (op name, dtype) -> why the compiled result legitimately differs from eager, or why no
# kernel forms. Strict xfails: each is rechecked every run and must be removed once fixed.
_TRUNC = ("eager's vectorized CPU trunc division of half types rounds the quotient to the half "
          "type before truncating (bf16 2.40625 / 0.482421875 = 4.988 -> 5.0 -> 5); its scalar "
          "path, float32 and the kernel truncate the float32 quotient (-> 4)")
_GELU = ("eager's vectorized erf gelu returns nan for +inf; its scalar path, float16 and the "
         "kernel return inf")
_ARANGE = ("declined: lowering.py's _arange raises Unsupported for a floating-point arange (eager "
           "adds i * step in the output dtype per vector lane); the group runs on ATen")
_PROD = ("eager's float16 prod overflows to inf (or underflows to 0) on partial products "
         "that the kernel's float32 accumulator holds; the kernel's product is exact")
_FLOOR = ("eager's vectorized bfloat16 floor division rounds (a - fmod(a, b)) / b to bfloat16 "
          "and can land one below the floor (2.875 // -0.024169921875 = floor(-118.95): eager "
          "-120; its scalar path, float32 and the kernel -119)")
_LN_INF = ("mean of a row holding +-inf: eager's Welford merge computes inf - inf and returns nan; "
           "the kernel returns the exact +-inf (the normalized output is nan in both)")
EXPECTED_FAILURES: dict[tuple[str, torch.dtype], str] = {
    ("div.Tensor_mode-trunc", bf16): _TRUNC,
    ("div.Tensor_mode-floor", bf16): _FLOOR,
    ("prod.dim_int-wide", f16): _PROD,
    ("div.Tensor_mode-trunc", f16): _TRUNC,
    ("gelu.default-inf", f32): _GELU,
    ("gelu.default-inf", bf16): _GELU,
    **{("arange.start_step", d): _ARANGE for d in (f32, bf16, f16)},
    **{("native_layer_norm.default-inf", d): _LN_INF for d in (f32, bf16, f16)},
}


def test_tables_are_covered():
    """Every fusible overload has a test here (update the lists above with the tables)."""
    tested = {o.overload for ops in FAMILIES.values() for o in ops} | set(DIRECT)
    missing = (POINTWISE | frozenset(REDUCTIONS)) - tested
    assert not missing, f"no numerics test for {sorted(map(str, missing))}"
    assert {o.overload for o in FAMILIES["view"]} | {aten.reshape.default} == VIEWS
    assert set(EXPECTED_FAILURES) <= {(o.name, d) for ops in FAMILIES.values() for o in ops
                                      for d in DTYPES} | {(_name(o), d) for o in DIRECT
                                                          for d in DTYPES}


# --- running -------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """One op at one dtype: its compiled and eager outputs, and what the compile did."""

    skip: str | None = None
    error: BaseException | None = None
    pairs: list[tuple[str, torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list)
    graph_ops: set[str] = dataclasses.field(default_factory=set)
    inline_ops: set[str] = dataclasses.field(default_factory=set)
    fallbacks: list[str] = dataclasses.field(default_factory=list)
    declined: list[str] = dataclasses.field(default_factory=list)  # why a group stayed on ATen
    cpp_partitions: int = 0

    @property
    def clean(self) -> bool:
        return (self.error is None and not self.fallbacks and not self.inline_ops
                and self.cpp_partitions > 0)


def _eager(fn, t):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # var over one element, etc.
        return fn(t)


def _valid_variants(o: Op, t: dict) -> tuple[list[tuple[str, Callable, torch.Tensor]], str]:
    """The variants eager accepts, with eager's result; and the last rejection."""
    valid, rejection = [], ""
    for name, fn in o.variants:
        try:
            valid.append((name, fn, _eager(fn, t)))
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
            rejection = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return valid, rejection


def _compile(variants: list[tuple[str, Callable, object]], t: dict) -> Outcome:
    """Compile one function returning every variant's output; record what the compile did."""
    names = list(t)
    fns = [fn for _, fn, _ in variants]

    def program(*args):
        inputs = dict(zip(names, args))
        return tuple(fn(inputs) for fn in fns)

    torch._dynamo.reset()
    jitopt.reset_counters()
    result = Outcome()
    with tempfile.TemporaryDirectory(prefix="jitopt-ops-") as dump, recording() as graphs:
        try:
            compiled = torch.compile(program, backend="jitopt", options={"debug_dir": dump})
            outputs = compiled(*t.values())
        except Exception as e:  # reported by the test of the op (or ops) compiled here
            result.error = e
            outputs = None
        result.graph_ops = _ops_in_dumps(Path(dump))
    torch._dynamo.reset()
    for g in graphs:
        result.fallbacks += g.fallbacks
        for a in g.aten:
            result.fallbacks += a.fallbacks
            result.inline_ops |= set(re.findall(r'aten_op\("aten::([\w.]+)"\)', a.wrapper_source))
            result.declined += [p.get("declined_reason") or p.get("fallback_reason")
                                for p in a.partitions
                                if p.get("declined_reason") or p.get("fallback_reason")]
    result.cpp_partitions = jitopt.counters["targets"]["cpp_partitions"]
    if outputs is not None:
        result.pairs = [(name, actual, expected)
                        for (name, _, expected), actual in zip(variants, outputs)]
    return result


def _ops_in_dumps(dump: Path) -> set[str]:
    """The overloads in the graphs handed to the partitioner (the group_fusions dumps)."""
    ops = set()
    for path in dump.glob("*/*_group_fusions.py"):
        ops |= set(re.findall(r"torch\.ops\.aten\.(\w+\.\w+)\(", path.read_text()))
    return ops


def _run_family(family: str, dtype: torch.dtype) -> dict[str, Outcome]:
    t = make_inputs(dtype)
    outcomes: dict[str, Outcome] = {}
    valid = {}
    for o in FAMILIES[family]:
        valid[o.name], rejection = _valid_variants(o, t)
        if not valid[o.name]:
            outcomes[o.name] = Outcome(skip=f"eager rejects {o.name} on {dtype}: {rejection}")
    alone = [o for o in FAMILIES[family] if valid[o.name] and (o.name, dtype) in EXPECTED_FAILURES]
    shared = [o for o in FAMILIES[family] if valid[o.name] and o not in alone]
    if shared:
        together = _compile([v for o in shared for v in valid[o.name]], t)
        if together.clean:
            pairs = iter(together.pairs)
            for o in shared:
                outcomes[o.name] = dataclasses.replace(
                    together, pairs=[next(pairs) for _ in valid[o.name]])
        else:  # find out which op it was: each alone
            alone += shared
    for o in alone:
        outcomes[o.name] = _compile(valid[o.name], t)
    return outcomes


_OUTCOMES: dict[tuple[str, torch.dtype], dict[str, Outcome]] = {}


def outcome(family: str, o: Op, dtype: torch.dtype) -> Outcome:
    key = (family, dtype)
    if key not in _OUTCOMES:
        _OUTCOMES[key] = _run_family(family, dtype)
    return _OUTCOMES[key][o.name]


def assert_matches_eager(pairs, tolerance=None) -> None:
    """Every variant's compiled output equals eager's (NaN equal to NaN); all mismatches are
    reported together. `tolerance`: dtype -> assert_close kwargs, for this op."""
    failures = []
    for name, actual, expected in _flat(pairs):
        tol = (tolerance or {}).get(expected.dtype) or HALF_TOLERANCE.get(expected.dtype, {})
        try:
            torch.testing.assert_close(actual, expected, equal_nan=True, **tol)
        except AssertionError as e:
            failures.append(f"[{name}] {e}")
    assert not failures, f"{len(failures)} of {len(pairs)} variants differ from eager:\n" + \
        "\n".join(failures)


def _flat(pairs):
    """Multi-output ops (native_layer_norm) compare output by output."""
    for name, actual, expected in pairs:
        if isinstance(expected, (tuple, list)):
            assert isinstance(actual, (tuple, list)) and len(actual) == len(expected)
            for k, (a, e) in enumerate(zip(actual, expected)):
                yield f"{name} output {k}", a, e
        else:
            yield name, actual, expected


def check(family: str, o: Op, dtype: torch.dtype) -> None:
    result = outcome(family, o, dtype)
    if result.skip:
        pytest.skip(result.skip)
    if result.error is not None:
        raise AssertionError(f"compiling {o.name} failed: {result.error!r}") from result.error
    # The kernel formed: the op reached the partitioner and all of the graph ran in kernels.
    assert _name(o.overload) in result.graph_ops, (
        f"{o.name} is not in the compiled graph ({sorted(result.graph_ops)})")
    assert not result.fallbacks, result.fallbacks
    assert not result.inline_ops, (
        f"left on ATen: {sorted(result.inline_ops)}; declined: {result.declined}")
    assert result.cpp_partitions > 0
    assert_matches_eager(result.pairs, o.tolerance)


def _params(ops):
    out = []
    for o in ops:
        for d in DTYPES:
            reason = EXPECTED_FAILURES.get((o.name, d))
            marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
            out.append(pytest.param(o, d, id=f"{o.name}-{DTYPE_IDS[d]}", marks=marks))
    return out


@pytest.mark.parametrize("o, dtype", _params(FAMILIES["pointwise"]))
def test_pointwise(o, dtype):
    check("pointwise", o, dtype)


@pytest.mark.parametrize("o, dtype", _params(FAMILIES["reduction"]))
def test_reduction(o, dtype):
    check("reduction", o, dtype)


@pytest.mark.parametrize("o, dtype", _params(FAMILIES["view"]))
def test_view_feeding_pointwise(o, dtype):
    check("view", o, dtype)


def _direct_params():
    out = []
    for overload in DIRECT:
        for d in DTYPES:
            reason = EXPECTED_FAILURES.get((_name(overload), d))
            marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
            out.append(pytest.param(overload, d, id=f"{_name(overload)}-{DTYPE_IDS[d]}",
                                    marks=marks))
    return out


@pytest.mark.parametrize("overload, dtype", _direct_params())
def test_direct_lowering(overload, dtype):
    """Overloads torch.compile never hands us, lowered from a one-node graph."""
    t = make_inputs(dtype)
    args = DIRECT[overload](t)
    try:
        expected = _eager(lambda _: overload(*args), t)
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
        pytest.skip(f"eager rejects {_name(overload)} on {dtype}: {e}")
    graph = fx.Graph()
    tensors = []

    def placeholder(value):
        if not isinstance(value, torch.Tensor):
            return value
        node = graph.placeholder(f"in{len(tensors)}")
        node.meta["val"] = value
        tensors.append(value)
        return node

    node = graph.call_function(overload, tuple(placeholder(a) for a in args))
    node.meta["val"] = expected
    graph.output(node)
    artifact = TARGETS["cpp"].lower(fx.GraphModule(torch.nn.Module(), graph))
    assert hasattr(artifact, "kernel_name"), f"no kernel formed: {artifact!r}"
    assert_matches_eager([("direct", artifact(*tensors), expected)])
