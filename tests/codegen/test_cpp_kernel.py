"""Golden C++ for canonical groups: the generated source stays readable and changes only on
purpose (EXPECTTEST_ACCEPT=1 rewrites the expectations after a deliberate change)."""

import expecttest
import torch
import torch.nn.functional as F

import jitopt


def _kernels(fn, *inputs) -> str:
    """The generated kernel functions (after the shared prelude), numerics checked first."""
    torch.testing.assert_close(torch.compile(fn, backend="jitopt")(*inputs), fn(*inputs))
    torch._dynamo.reset()
    report = jitopt.explain(fn, *inputs)
    (source,) = report.graphs[0].aten[0].kernel_sources
    return source[source.index('extern "C" void'):]


class TestGoldenCpp(expecttest.TestCase):
    def test_silu_is_one_flat_loop(self):
        source = _kernels(lambda x: x * torch.sigmoid(x), torch.randn(64, 128))
        self.assertExpectedInline(source, """\
extern "C" void fused_sigmoid_mul_f84d53e3d3(const float* __restrict__ in0, float* __restrict__ out0) {
  const int64_t chunks = (8192 + 4095) / 4096;
  #pragma omp parallel for schedule(static) if(8192 >= 32768)
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t end = chunk * 4096 + 4096 < 8192 ? chunk * 4096 + 4096 : 8192;
    #pragma omp simd
    for (int64_t i0 = chunk * 4096; i0 < end; ++i0) {
      const float t0 = in0[i0];
      const float t1 = (float(1) / (float(1) + jo_expf(-t0)));
      const float t2 = (t0 * t1);
      out0[i0] = t2;
    }
  }
}
""")

    def test_channels_last_is_walked_in_memory_order(self):
        # Regression: the loops followed the logical NCHW order, striding by C through a
        # channels-last tensor (the int8-static CNN's quantize steps ran 10x slower).
        x, y = (torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)
                for _ in range(2))
        source = _kernels(lambda x, y: torch.relu(x + y), x, y)
        self.assertExpectedInline(source, """\
extern "C" void fused_add_relu_2d486e6329(const float* __restrict__ in0, const float* __restrict__ in1, float* __restrict__ out0) {
  const int64_t chunks = (512 + 4095) / 4096;
  #pragma omp parallel for schedule(static) if(512 >= 32768)
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t end = chunk * 4096 + 4096 < 512 ? chunk * 4096 + 4096 : 512;
    #pragma omp simd
    for (int64_t i0 = chunk * 4096; i0 < end; ++i0) {
      const float t0 = in0[i0];
      const float t1 = in1[i0];
      const float t2 = (t0 + t1);
      const float t3 = jo_max<float>(t2, 0.0f);
      out0[i0] = t3;
    }
  }
}
""")

    def test_softmax_saves_exp_for_the_final_loop(self):
        source = _kernels(lambda x: torch.softmax(x, -1), torch.randn(8, 100))
        self.assertExpectedInline(source, """\
extern "C" void fused_softmax_43d3910f60(const float* __restrict__ in0, float* __restrict__ out0) {
  #pragma omp parallel for schedule(static) if(800 >= 32768)
  for (int64_t row = 0; row < 8; ++row) {
    const int64_t i0 = row;
    // reduction loop: max
    float acc0[32];
    for (int l = 0; l < 32; ++l) acc0[l] = -std::numeric_limits<float>::infinity();
    int64_t acc0_r0 = 0;
    for (; acc0_r0 + 32 <= 100; acc0_r0 += 32) {
      __builtin_prefetch(&in0[(100 + acc0_r0 + 100*i0)]);
      __builtin_prefetch(&in0[(116 + acc0_r0 + 100*i0)]);
      #pragma omp simd
      for (int64_t l = 0; l < 32; ++l) {
        const int64_t r = acc0_r0 + l;
        const float t1 = in0[(100*i0 + r)];
        acc0[l] = jo_max<float>(acc0[l], t1);
      }
    }
    float acc0_t = -std::numeric_limits<float>::infinity();
    for (int64_t r = acc0_r0; r < 100; ++r) {
      const float t2 = in0[(100*i0 + r)];
      acc0_t = jo_max<float>(acc0_t, t2);
    }
    float acc0_all = acc0_t;
    for (int l = 0; l < 32; ++l) acc0_all = jo_max<float>(acc0_all, acc0[l]);
    // reduction loop: sum
    float acc3[32];
    for (int l = 0; l < 32; ++l) acc3[l] = float(0);
    int64_t acc3_r0 = 0;
    for (; acc3_r0 + 32 <= 100; acc3_r0 += 32) {
      #pragma omp simd
      for (int64_t l = 0; l < 32; ++l) {
        const int64_t r = acc3_r0 + l;
        const float t4 = in0[(100*i0 + r)];
        const float t5 = (t4 - acc0_all);
        const float t6 = jo_expf(t5);
        acc3[l] = acc3[l] + t6;
        out0[(100*i0 + r)] = t6;
      }
    }
    float acc3_t = float(0);
    for (int64_t r = acc3_r0; r < 100; ++r) {
      const float t7 = in0[(100*i0 + r)];
      const float t8 = (t7 - acc0_all);
      const float t9 = jo_expf(t8);
      acc3_t = acc3_t + t9;
      out0[(100*i0 + r)] = t9;
    }
    float acc3_all = acc3_t;
    for (int l = 0; l < 32; ++l) acc3_all = acc3_all + acc3[l];
    #pragma omp simd
    for (int64_t r = 0; r < 100; ++r) {
      const float saved0 = out0[(100*i0 + r)];
      const float t10 = (float(1) / acc3_all);
      const float t11 = (saved0 * t10);
      out0[(100*i0 + r)] = t11;
    }
  }
}
""")

    def test_layer_norm_is_one_welford_pass_and_one_write(self):
        w, b = torch.randn(100), torch.randn(100)
        source = _kernels(lambda x: F.layer_norm(x, (100,), w, b), torch.randn(8, 100))
        self.assertExpectedInline(source, """\
extern "C" void fused_native_layer_norm_ac4da01c62(const float* __restrict__ in0, const float* __restrict__ in1, const float* __restrict__ in2, float* __restrict__ out0) {
  #pragma omp parallel for schedule(static) if(800 >= 32768)
  for (int64_t row = 0; row < 8; ++row) {
    const int64_t i0 = row;
    // reduction loop: welford
    float acc0_mean[32] = {}, acc0_m2[32] = {};
    int64_t acc0_r0 = 0;
    for (; acc0_r0 + 32 <= 100; acc0_r0 += 32) {
      const float inv_n = 1.0f / float(acc0_r0 / 32 + 1);
      __builtin_prefetch(&in0[(100 + acc0_r0 + 100*i0)]);
      __builtin_prefetch(&in0[(116 + acc0_r0 + 100*i0)]);
      #pragma omp simd
      for (int64_t l = 0; l < 32; ++l) {
        const int64_t r = acc0_r0 + l;
        const float t1 = in0[(100*i0 + r)];
        { const float delta = t1 - acc0_mean[l];
          acc0_mean[l] = acc0_mean[l] + delta * inv_n;
          acc0_m2[l] = acc0_m2[l] + delta * (t1 - acc0_mean[l]); }
      }
    }
    float acc0_mean_t = 0, acc0_m2_t = 0;
    for (int64_t r = acc0_r0; r < 100; ++r) {
      const float inv_n = 1.0f / float(r - acc0_r0 + 1);
      const float t2 = in0[(100*i0 + r)];
      { const float delta = t2 - acc0_mean_t;
        acc0_mean_t = acc0_mean_t + delta * inv_n;
        acc0_m2_t = acc0_m2_t + delta * (t2 - acc0_mean_t); }
    }
    float acc0_mean_all = 0, acc0_m2_all = 0; int64_t acc0_count = 0;
    for (int l = 0; l < 32 && acc0_r0 > 0; ++l)
      jo_welford_merge(acc0_mean_all, acc0_m2_all, acc0_count, acc0_mean[l], acc0_m2[l], acc0_r0 / 32);
    jo_welford_merge(acc0_mean_all, acc0_m2_all, acc0_count, acc0_mean_t, acc0_m2_t, 100 - acc0_r0);
    #pragma omp simd
    for (int64_t r = 0; r < 100; ++r) {
      const float t3 = in0[(100*i0 + r)];
      const float t4 = (t3 - acc0_mean_all);
      const float t5 = (acc0_m2_all / 100.0f);
      const float t6 = (t5 + 1e-05f);
      const float t7 = (float(1) / sqrtf(t6));
      const float t8 = (t4 * t7);
      const float t9 = in1[r];
      const float t10 = (t8 * t9);
      const float t11 = in2[r];
      const float t12 = (t10 + t11);
      out0[(100*i0 + r)] = t12;
    }
  }
}
""")


def test_exp_within_one_ulp_over_the_float_range():
    """jo_expf (the kernels' inline exp) against float64 exp: at most ~1 ulp everywhere, exact
    on the special values, overflow at the same point as eager, denormals kept."""
    specials = torch.tensor([float("-inf"), float("inf"), float("nan"), 0.0, -0.0, 88.72, 88.73,
                             -87.3, -103.9, -104.5, -1000.0, 1e-8])
    x = torch.cat([specials, torch.linspace(-110.0, 90.0, 400_001)])
    with torch.no_grad():
        got = torch.compile(torch.exp, backend="jitopt")(x)
    exact = torch.exp(x.double())
    torch.testing.assert_close(got[:len(specials)], torch.exp(specials), equal_nan=True)
    finite = exact.abs() <= torch.finfo(torch.float32).max
    ulp = torch.nextafter(exact.float(), torch.tensor(float("inf"))).double() - exact.float().double()
    error = ((got.double() - exact).abs() / ulp)[finite & (exact > 0)]
    assert error.max().item() <= 1.05
    assert torch.isinf(got[~finite & (x > 0)]).all()
