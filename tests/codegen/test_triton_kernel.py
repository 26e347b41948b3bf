"""The Triton renderer and target, run on CPU tensors in Triton's interpreter.

There is no GPU here, so every kernel runs with TRITON_INTERPRET=1 (set per test: @triton.jit
reads it when a generated module is imported, which happens inside lower_all). Groups are real:
ATen graphs captured with make_fx, lowered by the same lower_group the C++ target uses, launched
through the generated launcher, and compared with eager PyTorch.
"""

import os

import expecttest
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import jitopt
# targets before the rest: importing lowering or a target module first is a circular import
from jitopt.codegen.targets import Declined, register_target, unregister_target  # noqa: I001
from jitopt.codegen import triton_target
from jitopt.codegen.kernel_ir import POINTWISE_OPS, Buffer, Kernel, Load, Op, Store, outer_var
from jitopt.codegen.lowering import lower_group
from jitopt.codegen.triton_kernel import UNSUPPORTED_OPS, render_kernel
from jitopt.codegen.triton_target import TritonTarget

triton = pytest.importorskip("triton")
# The interpreter evaluates in numpy, which warns on the IEEE special values tests feed it.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

F = torch.nn.functional
# Reduction configs that make the r loop take several chunks, rows span programs, and one
# program hold a single row.
CHUNKED = [{"XBLOCK": 4, "RBLOCK": 16}]
ONE_ROW = [{"XBLOCK": 1, "RBLOCK": 32}]


@pytest.fixture(autouse=True)
def interpreted(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("JITOPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jitopt-cache"))


def lower(fn, *args, mode="real", configs=None):
    """The artifact for the group computing fn (every op of its ATen graph)."""
    gm = make_fx(fn, tracing_mode=mode)(*args)
    return TritonTarget(device="cpu", configs=configs).lower(gm)


def check(fn, *args, mode="real", configs=None, reference=None, **tol):
    """Run fn's kernel and compare with eager (or with `reference`'s result)."""
    out = lower(fn, *args, mode=mode, configs=configs)(*args)
    expected = (reference or fn)(*args)
    if isinstance(expected, torch.Tensor):
        out, expected = (out,), (expected,)
    assert len(out) == len(expected)
    for a, e in zip(out, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, (a.dtype, e.dtype, a.shape, e.shape)
        torch.testing.assert_close(a, e, equal_nan=True, **tol)


def in_float32(fn):
    """fn computed in float32 and rounded to the inputs' dtype once at the end: the IR's
    contract for half types (eager rounds after every op instead)."""
    def run(*args):
        dtype = args[0].dtype
        out = fn(*(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                   for a in args))
        return tuple(o.to(dtype) for o in out) if isinstance(out, tuple) else out.to(dtype)
    return run


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# --- pointwise ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_pointwise_chain(dtype):
    def fn(x, y):
        return torch.sigmoid((x * 1.5 + y).relu() - 0.25) * y
    x, y = randn(37, 29, dtype=dtype), randn(37, 29, dtype=dtype)
    check(fn, x, y, reference=in_float32(fn))
    check(fn, x, y, atol=2e-2, rtol=2e-2)  # and close to eager's per-op rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu(dtype):
    x = randn(4, 300, dtype=dtype)
    check(lambda x: x * torch.sigmoid(x), x, reference=in_float32(lambda x: x * torch.sigmoid(x)))


def test_broadcasting_and_strided_inputs():
    def fn(x, y, z):
        return (x + y) * z.t(), torch.where(x > 0, y, 2.0) - 1

    x, y, z = randn(5, 1, 7), randn(3, 1), randn(7, 3)
    check(fn, x, y, z)
    # a 0-d operand, compared and combined with logic (the interpreter mistypes scalar
    # comparisons: the renderer keeps every value a block)
    check(lambda x, s: (x * s, torch.logical_and(x, s), torch.hypot(x, s), torch.where(
        s > 0, x, -x)), x, torch.tensor(0.5))
    check(lambda s: (s + 1) * s, torch.tensor(3.0))  # a 0-d output
    art = lower(fn, x, y, z)
    # a transposed input is relaid out to the strides the kernel was compiled for
    out = art(x, y, randn(3, 7).t().contiguous().t())
    assert out[0].shape == (5, 3, 7)


def test_integer_and_bool_pointwise():
    def fn(a, b, m):
        return (torch.div(a * 3 - b, 4, rounding_mode="floor"), a % -3, torch.fmod(a, 3),
                torch.div(a, -7, rounding_mode="floor"), (a & b) | 5, ~a, torch.where(m, a, -b),
                m & (a > b), torch.logical_not(m), torch.maximum(a, b), torch.abs(a), a.sign())

    a = torch.randint(-50, 50, (64,))
    b = torch.randint(-50, 50, (64,))
    check(fn, a, b, a > 0)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.uint8])
def test_small_integer_types(dtype):
    a = torch.randint(0, 100, (50,)).to(dtype)
    check(lambda a, b: (a + b) * 2 - 1, a, a.flip(0))


def test_bool_comparisons_and_casts():
    def fn(m, n, x):
        return m < n, m >= n, m.float() * x, (x > 0).to(torch.int64) + m, x.to(torch.bool)

    m, n = torch.rand(40) > 0.5, torch.rand(40) > 0.5
    x = torch.tensor([0.0, -0.0, float("nan"), 1.5] * 10)
    check(fn, m, n, x)


def test_division_and_remainder_follow_eager():
    a = torch.tensor([1.0, -7.0, 7.0, -7.5, 0.3, 5.0, -0.0, 3.0, float("inf")])
    b = torch.tensor([0.1, 2.0, -2.0, 2.0, 0.1, 0.0, 3.0, float("inf"), 2.0])
    check(lambda a, b: (torch.div(a, b, rounding_mode="floor"), torch.remainder(a, b),
                        torch.fmod(a, b), torch.div(a, b, rounding_mode="trunc")), a, b)


def test_casts_round_like_eager():
    # float32 -> bfloat16/float16 round to nearest even, float -> int truncates
    x = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-11, 1.0 + 3 * 2**-11, -2.7, 2.7,
                      65520.0, 3.0e38, float("nan"), float("inf"), 1e-40])
    check(lambda x: (x.to(torch.bfloat16), x.to(torch.float16), x.to(torch.bfloat16).float()
                     * 2, x.clamp(-100, 100).to(torch.int64)), x)


UNARY = ["neg", "abs", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt",
         "sin", "cos", "tan", "sinh", "cosh", "tanh", "asinh", "acosh", "atanh", "erf",
         "sigmoid", "reciprocal", "floor", "ceil", "round", "trunc", "sign", "frac", "square",
         "isnan", "isinf", "isfinite", "signbit"]
SPECIAL = [0.0, -0.0, 1e-7, -1e-7, 1e-3, 0.3, -0.3, 0.5, -0.5, 1.5, 2.5, -2.5, 0.99, 1.0, 1.01,
           3.0, -20.0, 20.5, 50.0, -90.0, 100.0, 1e20, float("inf"), float("-inf"), float("nan")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", UNARY)
def test_unary_ops(op, dtype):
    x = torch.cat([torch.tensor(SPECIAL), torch.randn(40) * 3, torch.rand(20) * 2 - 1]).to(dtype)
    fn = getattr(torch, op)
    check(fn, x, rtol=4e-6 if dtype == torch.float32 else 1e-12, atol=1e-30)


def test_binary_float_ops():
    def fn(a, b):
        return (torch.maximum(a, b), torch.minimum(a, b), torch.copysign(a, b),
                torch.hypot(a, b), a ** 2, a ** 3, b ** -1, a.abs() ** 0.5, a.abs() ** -0.5,
                torch.pow(2.0, a), torch.pow(0.5, a), a ** 0, torch.clamp(a, -1, 1))

    special = [float("nan"), 1.0, -0.0, 0.0, float("inf"), 3e38, 1e-30, -5.0]
    a = torch.cat([torch.tensor(special), torch.randn(30)])
    b = torch.cat([torch.tensor(special[::-1]), torch.randn(30)])
    check(fn, a, b)


def test_activations():
    def fn(a):
        return (F.leaky_relu(a), F.elu(a), F.gelu(a), F.gelu(a, approximate="tanh"),
                F.hardtanh(a), F.silu(a), torch.relu(a))

    # the lowering's gelu formulas differ from eager's at +-inf, so finite values only
    check(fn, torch.randn(200) * 4)


def test_integer_pow():
    a = torch.randint(-9, 9, (30,))
    check(lambda a: (a ** 2, a ** 5, a ** 0), a)


@pytest.mark.parametrize("fn", [torch.asin, torch.atan, lambda x: torch.atan2(x, x + 1),
                                torch.erfc, lambda x: x ** 2.7, lambda x: x ** x])
def test_unsupported_ops_are_declined(fn):
    gm = make_fx(fn)(torch.rand(8))
    (result,) = TritonTarget(device="cpu").lower_all({"g": gm}).values()
    assert isinstance(result, Declined), result


def _one_op_kernel(op: str, dtype: torch.dtype) -> Kernel:
    """out0[i0] = op(in0[i0], ...), operands typed as POINTWISE_OPS says."""
    arity, rule = POINTWISE_OPS[op]
    args, out = [dtype] * arity, dtype
    if rule == "bool":
        args, out = [torch.bool] * arity, torch.bool
    elif rule == "compare":
        out = torch.bool
    elif op == "where":
        args = [torch.bool, dtype, dtype]
    elif op == "cast":
        out = torch.float32
    i0 = outer_var(0)
    loads = tuple(Load(f"in{k}", i0, d) for k, d in enumerate(args))
    return Kernel("kernel", tuple(Buffer(f"in{k}", d) for k, d in enumerate(args)),
                  (Buffer("out0", out),), (), (8,), None, (Store("out0", i0, Op(op, loads, out)),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_every_ir_op_renders_or_is_declined_on_purpose(dtype):
    declined = set()
    for op in POINTWISE_OPS:
        try:
            render_kernel(_one_op_kernel(op, dtype))
        except Declined:
            declined.add(op)
    if dtype.is_floating_point:
        # pow: only here with a tensor exponent; bitwise_not: not defined on floats
        assert declined == set(UNSUPPORTED_OPS) | {"pow", "bitwise_not"}
    else:
        # float math never reaches the IR on integers: eager promotes its input to float
        assert declined <= {op for op, (_, rule) in POINTWISE_OPS.items() if rule == "same"}
        assert not declined & {"add", "mul", "maximum", "minimum", "abs", "sign", "eq", "lt",
                               "where", "cast", "logical_and", "bitwise_xor", "square"}


def test_without_triton_every_group_is_declined(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now fails
    gm = make_fx(torch.sigmoid)(torch.rand(8))
    (result,) = TritonTarget(device="cpu").lower_all({"g": gm}).values()
    assert isinstance(result, Declined) and "triton is not installed" in str(result)


# --- reductions ---------------------------------------------------------------------------

@pytest.mark.parametrize("configs", [None, CHUNKED, ONE_ROW])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_softmax_and_log_softmax(dtype, configs):
    x = randn(9, 70, dtype=dtype) * 4
    fn = lambda x: (torch.softmax(x, -1), torch.log_softmax(x, -1))  # noqa: E731
    check(fn, x, configs=configs, reference=in_float32(fn))


@pytest.mark.parametrize("configs", [None, CHUNKED])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm(dtype, affine, configs):
    x = randn(6, 50, dtype=dtype) * 3 + 5
    w, b = (randn(50, dtype=dtype), randn(50, dtype=dtype)) if affine else (None, None)
    fn = lambda x, w, b: F.layer_norm(x, (50,), w, b)  # noqa: E731
    check(fn, x, w, b, configs=configs, reference=in_float32(fn))


def test_native_layer_norm_statistics():
    x = randn(3, 5, 40) + 10
    fn = lambda x: torch.ops.aten.native_layer_norm(x, [40], None, None, 1e-5)  # noqa: E731
    check(fn, x, configs=CHUNKED)


@pytest.mark.parametrize("configs", [None, CHUNKED, ONE_ROW])
def test_var_std_mean(configs):
    # a large offset: sum-of-squares variance would lose every digit here
    x = randn(7, 45) + 1000.0

    def fn(x):
        return (torch.var(x, -1), torch.std(x, -1, correction=0), torch.var(x, -1, keepdim=True),
                x.mean(-1), x.sum(-1, keepdim=True), x - x.mean(-1, keepdim=True))

    # against float64: eager's float32 sums are no better than the kernel's
    def exact(x):
        return tuple(o.float() for o in fn(x.double()))

    check(fn, x, configs=configs, reference=exact, rtol=1e-5, atol=5e-4)


@pytest.mark.parametrize("configs", [None, CHUNKED])
def test_max_min_arg_reductions_with_nan_and_ties(configs):
    x = torch.randint(-3, 3, (8, 37)).float()  # many ties
    x[1, 5] = x[1, 20] = float("nan")
    x[2] = float("-inf")
    x[3, 30] = float("nan")

    def fn(x):
        return x.amax(-1), x.amin(-1), x.argmax(-1), x.argmin(-1), x.argmax(-1, keepdim=True)

    check(fn, x, configs=configs)


def test_integer_and_bool_reductions():
    a = torch.randint(-100, 100, (6, 33))
    m = a > 0

    def fn(a, m):
        return (a.sum(-1), a.amax(-1), a.amin(-1), a.argmax(-1), a.argmin(-1), m.sum(-1),
                (a % 3 + 1).prod(-1), m.amax(-1), m.amin(-1))

    check(fn, a, m, configs=CHUNKED)


def test_prod_and_full_reduction():
    x = torch.rand(30) + 0.5
    check(lambda x: (x.prod(), x.sum(), x.amax(), x.argmax()), x, configs=CHUNKED)


def test_row_of_length_one_and_empty_rows():
    check(lambda x: torch.softmax(x, -1), randn(5, 1))
    x = randn(0, 8)
    out = lower(lambda x: torch.softmax(x, -1), x)(x)
    assert out.shape == (0, 8)


def test_softmax_over_a_permuted_input():
    x = randn(4, 6, 33)
    check(lambda x: torch.softmax(x.permute(0, 2, 1), -1), x, configs=CHUNKED)


# --- symbolic sizes -----------------------------------------------------------------------

def test_symbolic_sizes_one_kernel_many_shapes():
    fn = lambda x, y: (torch.softmax(x, -1) * y, x.sum(-1))  # noqa: E731
    art = lower(fn, randn(4, 16), randn(4, 16), mode="symbolic", configs=CHUNKED)
    assert "s" in art.library_source  # sizes are kernel arguments
    for rows, cols in [(4, 16), (7, 33), (1, 1), (3, 100)]:
        x, y = randn(rows, cols), randn(rows, cols)
        for a, e in zip(art(x, y), fn(x, y)):
            torch.testing.assert_close(a, e)


def test_symbolic_pointwise():
    fn = lambda x: torch.tanh(x) * 2 + x  # noqa: E731
    art = lower(fn, randn(5, 6), mode="symbolic")
    for shape in [(5, 6), (1, 100), (33, 3)]:
        x = randn(*shape)
        torch.testing.assert_close(art(x), fn(x))


# --- through torch.compile ----------------------------------------------------------------

@pytest.fixture
def cpu_triton():
    """A Triton target that takes CPU groups: run in the interpreter, end to end."""
    target = register_target(TritonTarget(name="triton-interpret", device="cpu",
                                          configs=CHUNKED + [{"XBLOCK": 128}]))
    yield target
    unregister_target(target.name)


def test_torch_compile_runs_groups_as_triton_kernels(cpu_triton, tmp_path):
    def fn(x, w, b):
        h = torch.relu(x @ w) * 0.5
        return F.layer_norm(h + 1, (16,), b, b), torch.softmax(h, -1).sum(-1)

    x, w, b = randn(8, 12), randn(12, 16), randn(16)
    compiled = torch.compile(fn, backend="jitopt", options={
        "targets": ("triton-interpret", "aten"), "debug_dir": str(tmp_path)})
    with torch.no_grad():
        for a, e in zip(compiled(x, w, b), fn(x, w, b)):
            torch.testing.assert_close(a, e)
    assert jitopt.counters["targets"]["triton_partitions"] >= 1
    assert jitopt.counters["fallbacks"]["partition"] == 0
    dumped = [p.name for p in tmp_path.rglob("*")]
    assert any(n.endswith(".py") and "kernels" in n for n in dumped), dumped


def test_a_later_target_leaves_carved_groups_alone(cpu_triton):
    """Regression: after the first target carved a group with two outputs, the getitems that
    unpack its call kept the group's tag, and the next fusion target (cpp) took them as a group
    of their own and failed to lower it (an IndexError; seen on a GPU, triton then cpp)."""
    def fn(x, r, w):  # pointwise only: older Triton interpreters fail on reductions
        h = x * 2 + r
        return h, torch.sigmoid(h) * w

    args = (randn(4, 8), randn(4, 8), randn(8))
    compiled = torch.compile(fn, backend="jitopt",
                             options={"targets": ("triton-interpret", "cpp", "aten")})
    for a, e in zip(compiled(*args), fn(*args)):
        torch.testing.assert_close(a, e)
    assert jitopt.counters["targets"]["triton_partitions"] == 1
    assert jitopt.counters["targets"]["declined_partitions"] == 0  # cpp was offered nothing
    assert jitopt.counters["fallbacks"]["partition"] == 0


@pytest.mark.gpu
def test_cuda_end_to_end(monkeypatch, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (this build or machine has none)")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # compiled for the GPU, not interpreted
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))

    def fn(x, w, b):
        y = torch.sigmoid(x * 1.5) * x
        return torch.softmax(y, -1), F.layer_norm(y, (y.shape[-1],), w, b), y.var(-1)

    args = [randn(64, 300, dtype=torch.float16).cuda(), randn(300).half().cuda(),
            randn(300).half().cuda()]
    compiled = torch.compile(fn, backend="jitopt", options={"targets": ("triton", "aten")})
    for a, e in zip(compiled(*args), in_float32(fn)(*args)):
        torch.testing.assert_close(a, e, atol=2e-3, rtol=2e-3)
    assert jitopt.counters["targets"]["triton_partitions"] >= 1
    assert jitopt.counters["fallbacks"]["partition"] == 0


# --- compiled for a GPU -------------------------------------------------------------------

POINTER_TYPES = {torch.float32: "*fp32", torch.float64: "*fp64", torch.float16: "*fp16",
                 torch.bfloat16: "*bf16", torch.int64: "*i64", torch.int32: "*i32",
                 torch.int8: "*i8", torch.uint8: "*u8", torch.bool: "*i1"}


def compile_for_cuda(fn, *args, mode="real", specialize_to_one=False):
    """Compile fn's kernel to PTX for an sm_90 GPU. No GPU is needed, and this checks what the
    interpreter does not: Triton's compile-time typing (loop-carried types, constexprs,
    tl.reduce over tuples, literal promotion)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, _ = lower_group(make_fx(fn, tracing_mode=mode)(*args), "kernel")
    module = triton_target.load_module(triton_target.render_source([kernel], {}))
    signature = {b.name: POINTER_TYPES[b.dtype] for b in (*kernel.inputs, *kernel.outputs)}
    signature |= {s.name: "i64" for s in kernel.size_args}
    constexprs = {"XBLOCK": 1024}
    if kernel.reduction_range is not None:
        constexprs = {"XBLOCK": 8, "RBLOCK": 64}
    if specialize_to_one:
        constexprs[kernel.size_args[0].name] = 1
    signature |= dict.fromkeys(constexprs, "constexpr")
    source = ASTSource(module.kernel, signature, constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


@pytest.fixture
def compiled(monkeypatch, tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    if not os.path.exists(triton.knobs.nvidia.ptxas.path):
        pytest.skip("Triton's bundled ptxas is missing")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_every_float_op_compiles_for_cuda(compiled, dtype):
    def fn(x, y):
        return tuple(getattr(torch, op)(x) for op in UNARY) + (
            torch.maximum(x, y), torch.minimum(x, y), torch.copysign(x, y), torch.hypot(x, y),
            x ** 2, x ** -3, x.abs() ** 0.5, torch.pow(2.0, x), torch.fmod(x, y),
            torch.div(x, y, rounding_mode="floor"), torch.remainder(x, y),
            x.to(torch.bfloat16), x.to(torch.float16), x.to(torch.int64), x.to(torch.bool),
            torch.clamp(x, -1, 1e-40), F.gelu(x), F.elu(x), F.leaky_relu(x), x * 1e-300)

    assert ".entry kernel" in compile_for_cuda(fn, randn(8, dtype=dtype), randn(8, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.uint8, torch.bool])
def test_every_integer_op_compiles_for_cuda(compiled, dtype):
    def fn(a, b):
        ints = () if dtype == torch.bool else (
            torch.div(a, b, rounding_mode="floor"), torch.remainder(a, b), torch.fmod(a, b),
            a ** 3, a * 3 - 1, torch.abs(a), torch.sign(a), a.sum(-1, keepdim=True) + a)
        return ints + (a & b, a | b, a ^ b, ~a, torch.maximum(a, b), torch.minimum(a, b),
                       a.float(), a.to(torch.bool), a < b, a.amax(-1), a.amin(-1))

    a, b = (torch.randint(1, 9, (4, 8)).to(dtype) for _ in range(2))
    assert ".entry kernel" in compile_for_cuda(fn, a, b)


def test_reductions_and_odd_shapes_compile_for_cuda(compiled):
    x, w = randn(4, 8, dtype=torch.float16), randn(8, dtype=torch.float16)
    assert compile_for_cuda(lambda x, w: (torch.softmax(x, -1), F.layer_norm(x, (8,), w, w),
                                          x.var(-1), x.argmin(-1)), x, w)
    fn = lambda x: (torch.log_softmax(x, -1), x.prod(-1), x.amin(-1))  # noqa: E731
    assert compile_for_cuda(fn, randn(4, 8), mode="symbolic")
    # a size of 1 arrives as a constexpr (Triton specializes it)
    assert compile_for_cuda(fn, randn(4, 8), mode="symbolic", specialize_to_one=True)
    assert compile_for_cuda(lambda x: x * 2 + 1, torch.tensor(3.0))  # 0-d
    assert compile_for_cuda(lambda x: x.sum(), randn(8))  # to a 0-d output


# --- generated source ---------------------------------------------------------------------

def _source(fn, *args):
    # the renderer alone: no Triton import, no interpreter
    kernel, _ = lower_group(make_fx(fn)(*args), "kernel")
    return render_kernel(kernel)


class TestTritonSource(expecttest.TestCase):
    def test_silu(self):
        self.assertExpectedInline(_source(lambda x: x * torch.sigmoid(x), randn(64, 128)), """\
@triton.jit
def kernel(in0, out0, XBLOCK: tl.constexpr):
    xnumel = 8192
    xindex = tl.program_id(0).to(tl.int64) * XBLOCK + tl.arange(0, XBLOCK)
    xmask = xindex < xnumel
    i0 = xindex
    t0 = tl.load(in0 + i0, mask=xmask, other=0.0)
    t1 = (1.0 / (1.0 + tl.exp(-t0)))
    t2 = (t0 * t1)
    tl.store(out0 + i0, t2, mask=xmask)
""")

    def test_softmax(self):
        self.assertExpectedInline(_source(lambda x: torch.softmax(x, -1), randn(64, 128)), """\
@triton.jit
def kernel(in0, out0, XBLOCK: tl.constexpr, RBLOCK: tl.constexpr):
    xnumel = 64
    rnumel = 128
    xindex = tl.program_id(0).to(tl.int64) * XBLOCK + tl.arange(0, XBLOCK)[:, None]
    xmask = xindex < xnumel
    rbase = tl.arange(0, RBLOCK)[None, :].to(tl.int64)
    i0 = xindex
    # loop 1: max
    acc0 = tl.full([XBLOCK, RBLOCK], float("-inf"), tl.float32)
    for roffset in range(0, rnumel, RBLOCK):
        r = roffset + rbase
        rmask = r < rnumel
        xrmask = xmask & rmask
        t0 = tl.load(in0 + (128*i0 + r), mask=xrmask, other=0.0)
        acc0 = tl.where(xrmask, _max_nan(acc0, t0), acc0)
    max0 = tl.reduce(acc0, 1, _max_nan)[:, None]
    # loop 2: sum
    acc1 = tl.full([XBLOCK, RBLOCK], 0, tl.float32)
    for roffset in range(0, rnumel, RBLOCK):
        r = roffset + rbase
        rmask = r < rnumel
        xrmask = xmask & rmask
        t1 = tl.load(in0 + (128*i0 + r), mask=xrmask, other=0.0)
        t2 = (t1 - max0)
        t3 = tl.exp(t2)
        acc1 = tl.where(xrmask, acc1 + t3, acc1)
    sum1 = tl.reduce(acc1, 1, _add)[:, None]
    t4 = (1.0 / sum1)
    # stores that depend on r
    for roffset in range(0, rnumel, RBLOCK):
        r = roffset + rbase
        rmask = r < rnumel
        xrmask = xmask & rmask
        t5 = tl.load(in0 + (128*i0 + r), mask=xrmask, other=0.0)
        t6 = (t5 - max0)
        t7 = tl.exp(t6)
        t8 = (t7 * t4)
        tl.store(out0 + (128*i0 + r), t8, mask=xrmask)
""")

    def test_layer_norm(self):
        fn = lambda x, w, b: F.layer_norm(x, (128,), w, b)  # noqa: E731
        self.assertExpectedInline(_source(fn, randn(64, 128), randn(128), randn(128)), """\
@triton.jit
def kernel(in0, in1, in2, out0, XBLOCK: tl.constexpr, RBLOCK: tl.constexpr):
    xnumel = 64
    rnumel = 128
    xindex = tl.program_id(0).to(tl.int64) * XBLOCK + tl.arange(0, XBLOCK)[:, None]
    xmask = xindex < xnumel
    rbase = tl.arange(0, RBLOCK)[None, :].to(tl.int64)
    i0 = xindex
    # loop 1: welford
    acc0_mean = tl.full([XBLOCK, RBLOCK], 0, tl.float32)
    acc0_m2 = tl.full([XBLOCK, RBLOCK], 0, tl.float32)
    acc0_n = tl.full([XBLOCK, RBLOCK], 0, tl.float32)
    for roffset in range(0, rnumel, RBLOCK):
        r = roffset + rbase
        rmask = r < rnumel
        xrmask = xmask & rmask
        t0 = tl.load(in0 + (128*i0 + r), mask=xrmask, other=0.0)
        acc0_mean, acc0_m2, acc0_n = _welford_step(acc0_mean, acc0_m2, acc0_n, t0, xrmask)
    mean0, m2_0, count0 = tl.reduce((acc0_mean, acc0_m2, acc0_n), 1, _welford_combine)
    mean0 = mean0[:, None]
    m2_0 = m2_0[:, None]
    count0 = count0[:, None]
    t1 = (m2_0 / 128.0)
    t2 = (t1 + 1e-05)
    t3 = tl.rsqrt(t2)
    # stores that depend on r
    for roffset in range(0, rnumel, RBLOCK):
        r = roffset + rbase
        rmask = r < rnumel
        xrmask = xmask & rmask
        t4 = tl.load(in0 + (128*i0 + r), mask=xrmask, other=0.0)
        t5 = (t4 - mean0)
        t6 = (t5 * t3)
        t7 = tl.load(in1 + r, mask=rmask, other=0.0)
        t8 = (t6 * t7)
        t9 = tl.load(in2 + r, mask=rmask, other=0.0)
        t10 = (t8 + t9)
        tl.store(out0 + (128*i0 + r), t10, mask=xrmask)
""")
