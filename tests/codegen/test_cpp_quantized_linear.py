"""The CPU target's quantized-weight linear kernels (int8, and 4-bit in groups) against the
ops' ATen references: row counts around the 4-row tile and the 64-row chunk, output channels
around the 64-channel block, groups that do not divide the input channels, bias or none,
symbolic rows, a non-contiguous x; and their generated source."""

import expecttest
import pytest
import torch

import jitopt
from jitopt.codegen.cpp_quantized_linear import QuantizedLinearSpec, render_quantized_linear
from jitopt.ops import (
    pack_int4_weight, pack_weight_blocks, unpack_int4_weight, unpack_weight_blocks)

pytestmark = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                                reason="the quantized-weight linear kernels are written for AVX-512")
linear_int8_weight = torch.ops.jitopt.linear_int8_weight
linear_int4_weight = torch.ops.jitopt.linear_int4_weight


def _operands(k, n, bias=True):
    torch.manual_seed(k * 1000 + n)
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n) / 100 + 1e-3
    return pack_weight_blocks(wq), scale, (torch.randn(n) if bias else None)


def _reference(x, weight, scale, bias):
    """In float64: the kernel sums in float32, in a different order than ATen."""
    w = unpack_weight_blocks(weight, scale.shape[0]).double() * scale.double()[:, None]
    out = x.double() @ w.t()
    return (out if bias is None else out + bias.double()).float()


def _compiled(**options):
    return torch.compile(lambda x, w, s, b: linear_int8_weight(x, w, s, b), backend="jitopt",
                         options=options)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 64, 67, 130])
@pytest.mark.parametrize("k,n", [(64, 64), (7, 100), (200, 1), (48, 130)])
def test_matches_the_reference(rows, k, n):
    weight, scale, bias = _operands(k, n)
    x = torch.randn(rows, k)
    got = _compiled()(x, weight, scale, bias)
    torch.testing.assert_close(got, _reference(x, weight, scale, bias), atol=1e-5, rtol=1e-5)
    assert jitopt.counters["kernels"]["cpp_quantized_linear"] == 1


def test_without_bias_and_with_a_transposed_x():
    weight, scale, _ = _operands(32, 80, bias=False)
    x = torch.randn(32, 9).t()  # [9, 32], not contiguous: the launcher copies it
    got = torch.compile(lambda x, w, s: linear_int8_weight(x, w, s), backend="jitopt")(
        x, weight, scale)
    torch.testing.assert_close(got, _reference(x, weight, scale, None), atol=1e-5, rtol=1e-5)
    assert jitopt.counters["kernels"]["cpp_quantized_linear"] == 1


def test_one_kernel_serves_every_row_count():
    weight, scale, bias = _operands(64, 96)
    compiled = _compiled()
    for rows in (2, 11, 300):
        x = torch.randn(rows, 64)
        torch._dynamo.mark_dynamic(x, 0)  # rows symbolic, the weight's sizes static
        torch.testing.assert_close(compiled(x, weight, scale, bias),
                                   _reference(x, weight, scale, bias), atol=1e-5, rtol=1e-5)
    assert jitopt.counters["graphs"]["compiled_inference"] == 1
    assert jitopt.counters["kernels"]["cpp_quantized_linear"] == 1


def test_the_reference_runs_where_the_kernel_is_not_used():
    weight, scale, bias = _operands(16, 20)
    x = torch.randn(3, 16)
    got = _compiled(targets=["aten"])(x, weight, scale, bias)
    torch.testing.assert_close(got, _reference(x, weight, scale, bias), atol=1e-5, rtol=1e-5)
    assert jitopt.counters["kernels"]["cpp_quantized_linear"] == 0


def _int4_operands(k, n, group_size):
    torch.manual_seed(k * 1000 + n + group_size)
    groups = -(-k // group_size)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scale, offset = torch.rand(n, groups) / 10 + 1e-3, torch.randn(n, groups)
    return q, scale, offset, torch.randn(n)


def _int4_reference(x, q, scale, offset, group_size, bias):
    k = q.shape[1]
    per_weight = lambda p: p.double().repeat_interleave(group_size, dim=1)[:, :k]  # noqa: E731
    w = q.double() * per_weight(scale) + per_weight(offset)
    return (x.double() @ w.t() + bias.double()).float()


@pytest.mark.parametrize("rows", [1, 4, 7, 70])
@pytest.mark.parametrize("k,n,group_size", [(64, 64, 64), (100, 70, 32), (48, 130, 7),
                                            (33, 5, 64)])
def test_int4_matches_the_reference(rows, k, n, group_size):
    q, scale, offset, bias = _int4_operands(k, n, group_size)
    x = torch.randn(rows, k)
    packed = (pack_int4_weight(q), pack_weight_blocks(scale), pack_weight_blocks(offset))
    fn = torch.compile(lambda x, w, s, o, b: linear_int4_weight(x, w, s, o, n, group_size, b),
                       backend="jitopt")
    got = fn(x, *packed, bias)
    want = _int4_reference(x, q, scale, offset, group_size, bias)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(linear_int4_weight(x, *packed, n, group_size, bias), want,
                               atol=1e-4, rtol=1e-5)  # the op's ATen reference too
    assert jitopt.counters["kernels"]["cpp_quantized_linear"] == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, 70])
@pytest.mark.parametrize("k,n", [(64, 64), (7, 100)])
def test_half_weights_match_the_reference(dtype, rows, k, n):
    torch.manual_seed(k + n)
    w, bias, x = torch.randn(n, k).to(dtype), torch.randn(n), torch.randn(rows, k)
    fn = torch.compile(lambda x, w, b: torch.ops.jitopt.linear_blocked_weight(x, w, n, b),
                       backend="jitopt")
    got = fn(x, pack_weight_blocks(w), bias)
    want = (x.double() @ w.double().t() + bias.double()).float()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert jitopt.counters["kernels"]["cpp_quantized_linear"] == 1


def test_pack_and_unpack_are_inverse():
    wq = torch.randint(-127, 128, (70, 5), dtype=torch.int8)
    packed = pack_weight_blocks(wq)
    assert packed.shape == (2, 5, 64)
    assert torch.equal(unpack_weight_blocks(packed, 70), wq)
    assert not packed[1, :, 6:].any()  # channels past N are zeros
    q4 = torch.randint(0, 16, (70, 5), dtype=torch.uint8)
    packed4 = pack_int4_weight(q4)
    assert packed4.shape == (2, 5, 32)
    assert torch.equal(unpack_int4_weight(packed4, 70), q4)
    assert packed4[0, 0, 0] == q4[0, 0] | (q4[32, 0] << 4)  # channel j + 32 in the high nibble


class TestGoldenSource(expecttest.TestCase):
    def test_kernel(self):
        source = render_quantized_linear(QuantizedLinearSpec(k=768, n=2304, bias=True),
                                         "quantized_linear_0")
        self.assertExpectedInline(source, """\

extern "C" void quantized_linear_0(const float* __restrict__ x, const int8_t* __restrict__ w,
    const float* __restrict__ scale, const float* __restrict__ bias,
    float* __restrict__ y, int64_t M) {
  constexpr int64_t K = 768, N = 2304, BLOCKS = 36;
  const int64_t chunks = (M + 63) / 64;
  #pragma omp parallel for collapse(2) schedule(static) if(M * N * K >= (1 << 18))
  for (int64_t nb = 0; nb < BLOCKS; ++nb) {
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const int cols = int(std::min<int64_t>(64, N - nb * 64));
      const int64_t end = std::min<int64_t>(M, (chunk + 1) * 64);
      int64_t m = chunk * 64;
      for (; m + 4 <= end; m += 4)
        jo_wide_tile<4, JO_INT8>(x + m * K, K, w + nb * K * 64, K, scale + nb * 64,
            bias + nb * 64, y + m * N + nb * 64, N, cols);
      for (; m < end; ++m)
        jo_wide_tile<1, JO_INT8>(x + m * K, K, w + nb * K * 64, K, scale + nb * 64,
            bias + nb * 64, y + m * N + nb * 64, N, cols);
    }
  }
}
""")

    def test_int4_kernel(self):
        source = render_quantized_linear(
            QuantizedLinearSpec(k=3072, n=768, bias=False, weight="int4", group_size=64),
            "quantized_linear_1")
        self.assertExpectedInline(source, """\

extern "C" void quantized_linear_1(const float* __restrict__ x, const uint8_t* __restrict__ w,
    const float* __restrict__ scale, const float* __restrict__ offset,
    float* __restrict__ y, int64_t M) {
  constexpr int64_t K = 3072, N = 768, BLOCKS = 12, G = 64, GROUPS = 48;
  const int64_t chunks = (M + 63) / 64;
  #pragma omp parallel for collapse(2) schedule(static) if(M * N * K >= (1 << 18))
  for (int64_t nb = 0; nb < BLOCKS; ++nb) {
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const int cols = int(std::min<int64_t>(64, N - nb * 64));
      const int64_t end = std::min<int64_t>(M, (chunk + 1) * 64);
      int64_t m = chunk * 64;
      for (; m + 4 <= end; m += 4)
        jo_w4_tile<4>(x + m * K, K, w + nb * K * 32, K, G,
            scale + nb * GROUPS * 64, offset + nb * GROUPS * 64,
            nullptr, y + m * N + nb * 64, N, cols);
      for (; m < end; ++m)
        jo_w4_tile<1>(x + m * K, K, w + nb * K * 32, K, G,
            scale + nb * GROUPS * 64, offset + nb * GROUPS * 64,
            nullptr, y + m * N + nb * 64, N, cols);
    }
  }
}
""")
