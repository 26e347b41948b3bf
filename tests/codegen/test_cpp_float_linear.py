"""The CPU target's float32 blocked-weight linear kernel against a float64 product: row
counts around the 6-row tile, input channels around the 512-channel chunk, output channels
around the 64-channel block, bias or none, each activation, symbolic rows, a non-contiguous
x; and its generated source."""

import expecttest
import pytest
import torch

import jitopt
from jitopt.codegen.cpp_float_linear import FloatLinearSpec, render_float_linear
from jitopt.ops import LINEAR_ACTIVATIONS, pack_weight_blocks

pytestmark = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                                reason="the blocked-weight linear kernel is written for AVX-512")
linear_blocked_weight = torch.ops.jitopt.linear_blocked_weight


def _operands(k, n, bias=True):
    torch.manual_seed(k * 1000 + n)
    w = torch.randn(n, k) / k ** 0.5
    return w, pack_weight_blocks(w), (torch.randn(n) if bias else None)


def _reference(x, w, bias, activation="none"):
    """In float64: the kernel sums in float32, in a different order than ATen."""
    out = x.double() @ w.double().t()
    out = out if bias is None else out + bias.double()
    return LINEAR_ACTIVATIONS[activation](out).float()


def _compiled(n, activation="none", **options):
    return torch.compile(lambda x, w, b: linear_blocked_weight(x, w, n, b, activation),
                         backend="jitopt", options=options)


@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 130])
@pytest.mark.parametrize("k,n", [(64, 64), (7, 100), (512, 70), (1100, 129)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_a_float64_product(rows, k, n, bias):
    w, packed, b = _operands(k, n, bias)
    x = torch.randn(rows, k)
    got = _compiled(n)(x, packed, b)
    torch.testing.assert_close(got, _reference(x, w, b), atol=2e-5, rtol=1e-5)
    assert jitopt.counters["kernels"]["cpp_float_linear"] == 1


@pytest.mark.parametrize("activation", sorted(LINEAR_ACTIVATIONS))
def test_activations_match_the_reference(activation):
    w, packed, b = _operands(600, 100)
    x = torch.randn(9, 600) * 2
    got = _compiled(100, activation)(x, packed, b)
    torch.testing.assert_close(got, _reference(x, w, b, activation), atol=2e-5, rtol=1e-5)
    # the op's ATen reference too
    torch.testing.assert_close(linear_blocked_weight(x, packed, 100, b, activation),
                               _reference(x, w, b, activation), atol=2e-5, rtol=1e-5)
    assert jitopt.counters["kernels"]["cpp_float_linear"] == 1


def test_relu_keeps_nan():
    w, packed, b = _operands(16, 64)
    x = torch.randn(3, 16)
    x[1, 2] = float("nan")
    got = _compiled(64, "relu")(x, packed, b)
    assert got[1].isnan().all() and not got[[0, 2]].isnan().any()


def test_symbolic_rows_and_a_non_contiguous_x():
    w, packed, b = _operands(40, 70)
    fn = _compiled(70)
    for rows in (2, 9, 31):
        x = torch.randn(40, rows).t()  # [rows, 40], not contiguous
        torch.testing.assert_close(fn(x, packed, b), _reference(x, w, b), atol=2e-5,
                                   rtol=1e-5)
    # both graphs (static 2 rows, then symbolic rows, K static) on the kernel
    assert jitopt.counters["kernels"]["cpp_float_linear"] == 2


def test_zero_rows():
    w, packed, b = _operands(16, 64)
    assert _compiled(64)(torch.randn(0, 16), packed, b).shape == (0, 64)


class TestGoldenSource(expecttest.TestCase):
    def test_kernel(self):
        source = render_float_linear(FloatLinearSpec(k=768, n=2304, bias=True,
                                                     activation="gelu_tanh"), "float_linear_0")
        self.assertExpectedInline(source, """\

extern "C" void float_linear_0(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias, float* __restrict__ y, int64_t M) {
  jo_float_linear<768, 2304, JO_ACT_GELU_TANH>(x, w, bias, y, M);
}
""")


def test_no_input_channels_runs_the_reference():
    packed, bias = pack_weight_blocks(torch.randn(70, 0)), torch.randn(70)
    got = _compiled(70)(torch.randn(3, 0), packed, bias)
    torch.testing.assert_close(got, bias.expand(3, 70))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_reference_takes_zero_rows(dtype):
    """Regression: the ATen reference (what runs while the kernel builds) failed to reshape
    an empty product."""
    packed, bias = pack_weight_blocks(torch.randn(70, 16).to(dtype)), torch.randn(70)
    assert linear_blocked_weight(torch.randn(0, 16), packed, 70, bias, "relu").shape == (0, 70)
