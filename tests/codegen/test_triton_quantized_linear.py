"""The GPU target's quantized linears (codegen/triton_quantized_linear.py), run in Triton's
interpreter on CPU tensors (no GPU here): each kernel against its op's ATen reference, the
quantize modes end to end through torch.compile against the same modes on ATen, and the
rendered source as golden text."""

import expecttest
import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import jitopt
from jitopt.codegen.targets import register_target, unregister_target
from jitopt.codegen.triton_quantized_linear import (
    TritonLinearSpec, render_triton_linear, render_triton_linear_launcher, tiles,
    triton_linear_groups)
from jitopt.codegen.triton_target import TritonTarget
from jitopt.ops import pack_int4_weight, pack_weight_blocks
from jitopt.passes.quantize_linear_int4_weight_only import quantize_int4_grouped
from jitopt.passes.quantize_linear_int8 import quantize_per_channel

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
ops = torch.ops.jitopt


@pytest.fixture(autouse=True)
def interpreted(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("JITOPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jitopt-cache"))


def _kernel(fn, *args):
    """fn's graph lowered by a CPU Triton target: the quantized linear's launcher."""
    gm = make_fx(fn)(*args)
    assert len(triton_linear_groups(gm, "cpu")) == 1
    return TritonTarget(device="cpu").lower(gm)


def _int8_weight(n, k):
    wq, scale = quantize_per_channel(torch.randn(n, k))
    return pack_weight_blocks(wq), scale


def _int4_weight(n, k, group_size):
    q, scale, offset = quantize_int4_grouped(torch.randn(n, k), group_size)
    return pack_int4_weight(q), pack_weight_blocks(scale), pack_weight_blocks(offset)


@pytest.mark.parametrize("rows", [1, 5, 37])
@pytest.mark.parametrize("n", [40, 130])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_weight_kernel_matches_the_op(rows, n, bias):
    torch.manual_seed(rows + n)
    k = 96
    w, scale = _int8_weight(n, k)
    b = torch.randn(n) if bias else None
    x = torch.randn(k, rows).t()  # a transposed view: the kernel takes x's strides

    def fn(x, w, scale, b):
        return ops.linear_int8_weight(x, w, scale, b)

    got = _kernel(fn, x, w, scale, b)(x, w, scale, b)
    torch.testing.assert_close(got, fn(x, w, scale, b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 19])
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_int4_weight_kernel_matches_the_op(rows, group_size, bias):
    torch.manual_seed(rows + group_size)
    n, k = 70, 96  # a partial block of output channels; with 64, a partial last group
    w, scale, offset = _int4_weight(n, k, group_size)
    b = torch.randn(n) if bias else None
    x = torch.randn(rows, k)

    def fn(x, w, scale, offset, b):
        return ops.linear_int4_weight(x, w, scale, offset, n, group_size, b)

    got = _kernel(fn, x, w, scale, offset, b)(x, w, scale, offset, b)
    torch.testing.assert_close(got, fn(x, w, scale, offset, b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 16, 45])
@pytest.mark.parametrize("weight_order", ["NK", "KN"])
def test_int8_by_int8_kernel_is_exact(rows, weight_order):
    torch.manual_seed(rows)
    a = torch.randint(-127, 128, (rows, 80), dtype=torch.int8)
    w = torch.randint(-127, 128, (72, 80), dtype=torch.int8)
    b = w.t() if weight_order == "NK" else w.t().contiguous()
    got = _kernel(torch._int_mm, a, b)(a, b)
    assert got.dtype == torch.int32
    assert torch.equal(got, a.int() @ b.int())


def test_half_x_reads_and_writes_half():
    # float16, not bfloat16: Triton 3.9's interpreter multiplies bfloat16 tl.dot operands as
    # their raw 16-bit patterns (a GPU does not); the bfloat16 path runs in test_cuda_models.
    torch.manual_seed(0)
    w, scale = _int8_weight(64, 64)
    x = torch.randn(3, 64, dtype=torch.float16)

    def fn(x, w, scale):
        return ops.linear_int8_weight(x, w, scale)

    got = _kernel(fn, x, w, scale)(x, w, scale)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, fn(x, w, scale), atol=0.05, rtol=0.02)


def test_int4_groups_a_tile_cannot_divide_are_left_to_aten():
    w, scale, offset = _int4_weight(64, 64, 8)
    x = torch.randn(2, 64)
    gm = make_fx(lambda x, w, s, o: ops.linear_int4_weight(x, w, s, o, 64, 8))(
        x, w, scale, offset)
    assert triton_linear_groups(gm, "cpu") == []


@pytest.mark.parametrize("rows, claimed", [(4, True), (16, True), (17, False), (64, False)])
def test_on_cuda_int8_products_go_to_triton_only_where_cublaslt_refuses_them(rows, claimed):
    with FakeTensorMode():
        a = torch.empty(rows, 64, dtype=torch.int8, device="cuda")
        b = torch.empty(64, 32, dtype=torch.int8, device="cuda")
        gm = make_fx(torch._int_mm)(a, b)
    assert bool(triton_linear_groups(gm, "cuda")) is claimed


# --- through torch.compile ----------------------------------------------------------------

@pytest.fixture
def cpu_triton():
    target = register_target(TritonTarget(name="triton-interpret", device="cpu",
                                          configs=[{"XBLOCK": 128}]))
    yield target
    unregister_target(target.name)


@pytest.mark.parametrize("mode, kernels", [("int8-weight-only", 2), ("int4-weight-only", 2),
                                           ("int8", 2)])
def test_quantize_modes_run_triton_kernels_and_match_aten(cpu_triton, mode, kernels):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 80), nn.GELU(), nn.Linear(80, 40, bias=False)).eval()
    options = {"quantize": mode, **({"quantize_group_size": 32} if "int4" in mode else {})}
    x = torch.randn(6, 96)
    with torch.no_grad():
        on_aten = torch.compile(model, backend="jitopt",
                                options={**options, "targets": ("aten",)})(x)
        torch._dynamo.reset()
        jitopt.counters.clear()
        compiled = torch.compile(model, backend="jitopt",
                                 options={**options, "targets": ("triton-interpret", "aten")})
        got = compiled(x)
    assert jitopt.counters["kernels"]["triton_quantized_linear"] == kernels
    assert jitopt.counters["fallbacks"]["partition"] == 0
    torch.testing.assert_close(got, on_aten, atol=1e-4, rtol=1e-4)


class TestGoldenSource(expecttest.TestCase):
    def test_int8_weight_kernel(self):
        spec = TritonLinearSpec("int8", k=96, n=130, x_dtype=torch.float32, bias=True)
        source = render_triton_linear(spec, "quantized_linear_0", tiles(spec, interpret=True))
        self.assertExpectedInline(source, """\
@triton.autotune(
    configs=[
        triton.Config({'BLOCK_M': 16, 'BLOCK_K': 64}, num_warps=4),
    ],
    key=['M'],
)
@triton.jit
def quantized_linear_0(x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, M, stride_xm, stride_xk,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # y[M, 130] = x[M, 96] @ (w * scale[:, None]).T + bias: w int8 [N / 64, K, 64]
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    lanes = tl.arange(0, 64)
    cols = tl.program_id(1) * 64 + lanes
    block = w_ptr + tl.program_id(1) * 6144
    acc = tl.full((BLOCK_M, 64), 0.0, tl.float32)
    for k0 in range(0, 96, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=(rows[:, None] < M) & (ks[None, :] < 96), other=0.0)
        w = tl.load(block + ks[:, None] * 64 + lanes[None, :],
                    mask=ks[:, None] < 96, other=0)
        acc += tl.dot(x, w.to(tl.float32), input_precision="ieee")
    scale = tl.load(scale_ptr + cols, mask=cols < 130, other=0.0)
    y = acc * scale[None, :]
    y += tl.load(bias_ptr + cols, mask=cols < 130, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * 130 + cols[None, :], y.to(tl.float32),
             mask=(rows[:, None] < M) & (cols[None, :] < 130))
""")
