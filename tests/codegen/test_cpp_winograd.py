"""The CPU target's Winograd kernel: its generated source (golden), and its spec's limits."""

import expecttest
import pytest
import torch
import torch.nn as nn

import jitopt
from jitopt.codegen.cpp_winograd import WinogradSpec, render_winograd

pytestmark = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                                reason="the Winograd kernel is written for AVX-512")


def test_kernels_of_one_spec_are_shared_and_scratch_is_kept_between_calls():
    """Two layers of one shape share one kernel; a second call reuses the scratch buffers
    (the same values, so nothing of the first call leaks into the second)."""
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()).eval()
    compiled = torch.compile(model, backend="jitopt", options={"on_error": "raise"})
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(1, 64, 16, 16)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)
        jitopt.finish_compiles()
        x = torch.randn(1, 64, 16, 16)
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)
        assert jitopt.counters["kernels"]["cpp_winograd"] == 2
        source = jitopt.explain(model, x).graphs[0].aten[0].kernel_sources
    assert sum(s.count('extern "C" void winograd_') for s in source) == 1


class TestGoldenSource(expecttest.TestCase):
    def test_kernel(self):
        spec = WinogradSpec(batch=8, in_channels=64, out_channels=128, height=7, width=7,
                            bias=True, other=True, relu=True)
        self.assertExpectedInline(render_winograd(spec, "winograd_0"), """\

extern "C" void winograd_0(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias, const float* __restrict__ other, float* __restrict__ y) {
  constexpr int64_t C = 64, K = 128, H = 7, W = 7;
  constexpr int64_t TH = 4, TW = 4, T = 128;
  #pragma omp parallel
  {
    static thread_local std::vector<float> u_buffer, m_buffer;
    u_buffer.resize(16 * 24 * C);
    m_buffer.resize(16 * 24 * 64);
    float* u = u_buffer.data();
    float* m = m_buffer.data();
    #pragma omp for schedule(static)
    for (int64_t t0 = 0; t0 < T; t0 += 24) {
      const int64_t tiles = std::min<int64_t>(24, T - t0);
      for (int64_t t = t0; t < t0 + tiles; ++t) {
        const int64_t n = t / (TH * TW), th = t / TW % TH, tw = t % TW;
        for (int64_t c = 0; c < C; c += 16)
          jo_wino_input(x + n * H * W * C + c, H, W, C, 2 * th - 1, 2 * tw - 1,
                        u + (t - t0) * C + c, 24 * C);
      }
      for (int64_t kb = 0; kb < K; kb += 64) {
        for (int64_t p = 0; p < 16; ++p)
          for (int64_t r = 0; r < tiles; r += 6)
            jo_wino_gemm_tile(int(std::min<int64_t>(6, tiles - r)), u + (p * 24 + r) * C,
                              w + p * C * K + kb, C, K, m + (p * 24 + r) * 64, 64);
        for (int64_t t = t0; t < t0 + tiles; ++t) {
          const int64_t n = t / (TH * TW), th = t / TW % TH, tw = t % TW;
          const int64_t rows = std::min<int64_t>(2, H - 2 * th), cols = std::min<int64_t>(2, W - 2 * tw);
          const int64_t at = ((n * H + 2 * th) * W + 2 * tw) * K;
          for (int64_t k = 0; k < 64; k += 16)
            jo_wino_output<true>(m + (t - t0) * 64 + k, 24 * 64, bias + kb + k, other + at + kb + k, y + at + kb + k, W * K, K, rows, cols);
        }
      }
    }
  }
}
""")
