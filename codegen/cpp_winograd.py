"""A generated C++ kernel for `jitopt::conv3x3_winograd` on the CPU target: a 3x3, stride-1,
padding-1 convolution of channels-last float32 input by Winograd F(2x2, 3x3).

Why our own: oneDNN (through PyTorch) runs only direct convolutions here, at 460-560
GFLOP/s; F(2x2, 3x3) needs 16 products per 2x2 outputs instead of 36, so even a plain GEMM
tile beats it on ResNet's 3x3 layers (batch 8, measured alone, interleaved): 3.4 ms against
4.3 at 64 channels (56 x 56), 2.2 against 4.5 at 128 (28 x 28), 1.9 against 3.7 at 256
(14 x 14), 2.7 against 3.8 at 512 (7 x 7). Three steps:

1. input transform: each 4x4 tile of 16 channels (zeros past the edges) to u = B^T d B,
   stored as u[p][tile][channel] for the 16 points p;
2. 16 GEMMs m[p] = u[p] [tiles, C] x w[p] [C, K], a 6-row x 64-column register tile each
   (w[p] was transformed once at compile time, jitopt/ops.py: winograd_weight);
3. output transform y = A^T m A per tile, plus the bias, the residual and the ReLU, stored
   channels-last (outputs past the edge of an odd size are dropped).

Where the transformed weight is small (C x K <= 65536: 4 MB, it stays in cache) the steps
run per block of 24 tiles in one thread, u and m in that thread's own buffers (kept for the
thread's life, as small as the weight is), so they never leave the cache (64 and 128
channels: 2.4-2.6 ms against 3.0-3.8 for the phased form). A bigger weight would be read
again for every block (512 channels: 4.0 against 3.0 ms), so there each step runs over all
tiles in turn, in parallel, u and m in scratch buffers the launcher keeps between calls.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

import jitopt.ops  # noqa: F401  (registers torch.ops.jitopt)
from jitopt.errors import Declined

WINOGRAD = torch.ops.jitopt.conv3x3_winograd.default
LANES = 16  # floats per AVX-512 vector
ROWS, COLUMNS = 6, 64  # the GEMM's register tile: 6 tiles x 64 output channels
BLOCKED_MAX_WEIGHT = 65536  # C x K up to which the steps run per block of tiles
TILE_BLOCK = 24  # tiles per block, a multiple of ROWS (measured against 48 and 96)


@dataclasses.dataclass(frozen=True)
class WinogradSpec:
    """One call's static sizes: x [N, C, H, W] and the output [N, K, H, W], both
    channels-last; a bias, a residual `other` (channels-last, the output's shape) and a ReLU
    or not."""

    batch: int
    in_channels: int
    out_channels: int
    height: int
    width: int
    bias: bool
    other: bool
    relu: bool

    @property
    def tiles(self) -> int:
        return self.batch * -(-self.height // 2) * -(-self.width // 2)

    @property
    def blocked(self) -> bool:
        """Run the three steps per block of tiles, in each thread's own buffers (kept for
        the thread's life: 16 x 24 x (C + 64) floats, 0.4 MB at 256 channels)?"""
        return self.in_channels * self.out_channels <= BLOCKED_MAX_WEIGHT


def winograd_spec(node: fx.Node) -> WinogradSpec:
    """The spec of a `jitopt::conv3x3_winograd` node, or Declined."""
    if node.target is not WINOGRAD:
        raise Declined(f"not a Winograd convolution: {node.target}")
    x, weight, bias, other, unary = node.args
    xv, wv = x.meta.get("val"), weight.meta.get("val")
    if not isinstance(xv, torch.Tensor) or xv.device.type != "cpu" or xv.dtype != torch.float32:
        raise Declined("Winograd kernel: a float32 CPU input only")
    if not all(isinstance(d, int) for d in xv.shape) or unary not in ("none", "relu"):
        raise Declined("Winograd kernel: static sizes, no unary op but relu")
    n, c, h, w = xv.shape
    k = wv.shape[2]
    if c % LANES or k % COLUMNS:
        raise Declined(f"Winograd kernel: channels in a multiple of {LANES}, out of {COLUMNS}")
    return WinogradSpec(n, c, k, h, w, bias is not None, other is not None, unary == "relu")


def winograd_node(gm: fx.GraphModule) -> fx.Node | None:
    """The convolution of a partition winograd_groups proposed, else None."""
    return next((n for n in gm.graph.nodes if n.target is WINOGRAD), None)


def winograd_groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Each Winograd convolution the kernel can run, alone in its group."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return []  # the kernel is written for AVX-512; elsewhere the op's reference runs
    groups = []
    for node in gm.graph.nodes:
        if node.target is WINOGRAD:
            try:
                winograd_spec(node)
            except Declined:
                continue
            groups.append([node])
    return groups


def winograd_pointers(spec: WinogradSpec) -> int:
    """x, w, [bias], [other], [u, m], y."""
    return 3 + spec.bias + spec.other + 2 * (not spec.blocked)


def _channels_last(channels: int, height: int, width: int) -> tuple[int, ...]:
    return height * width * channels, 1, width * channels, channels


def winograd_output_layout(spec: WinogradSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    s = spec
    return ((s.batch, s.out_channels, s.height, s.width),
            _channels_last(s.out_channels, s.height, s.width))


def render_winograd_launcher(name: str, spec: WinogradSpec, gm: fx.GraphModule) -> str:
    """Python that brings x and the residual to channels-last (a copy only if they are not),
    takes the phased form's scratch buffers (kept between calls), allocates the output (or
    takes the memory plan's `out0`) and calls the kernel."""
    from jitopt.codegen.fusion_target import layout_check, size_tuple, tensor_params

    s = spec
    x, weight, bias, other, _ = winograd_node(gm).args
    params, _ = tensor_params(gm)
    shape, strides = winograd_output_layout(spec)
    operands = [x.name, weight.name] + [t.name for t in (bias, other) if t is not None]
    lines = [f"def {name}({', '.join(params + ['out0=None'])}):",
             *layout_check(x.name, tuple(x.meta["val"].shape),
                           _channels_last(s.in_channels, s.height, s.width))]
    if other is not None:
        lines += layout_check(other.name, shape, strides)
    if not s.blocked:
        lines += [f"    u = recycled1((16, {s.tiles}, {s.in_channels}), "
                  f"({s.tiles * s.in_channels}, {s.in_channels}, 1), torch.float32)",
                  f"    m = recycled2((16, {s.tiles}, {s.out_channels}), "
                  f"({s.tiles * s.out_channels}, {s.out_channels}, 1), torch.float32)"]
        operands += ["u", "m"]
    lines += [f"    if out0 is not None and (out0.shape != {size_tuple(shape)} or "
              f"out0.stride() != {size_tuple(strides)}):", "        out0 = None",
              "    if out0 is None:",
              f"        out0 = recycled0({size_tuple(shape)}, {size_tuple(strides)}, "
              "torch.float32)",
              f"    kernel({', '.join(f'{o}.data_ptr()' for o in operands)}, out0.data_ptr())",
              "    return out0"]
    return "\n".join(lines) + "\n"


def render_winograd(spec: WinogradSpec, name: str) -> str:
    """C++ for `name(x, w, [bias,] [other,] [u, m,] y)`; needs AVX-512F."""
    s = spec
    inputs = ["x", "w"] + [p for p, on in (("bias", s.bias), ("other", s.other)) if on]
    outputs = ["y"] if s.blocked else ["u", "m", "y"]
    params = ", ".join([f"const float* __restrict__ {p}" for p in inputs]
                       + [f"float* __restrict__ {p}" for p in outputs])
    steps = _blocked_steps(s) if s.blocked else _phased_steps(s)
    return f"""
extern "C" void {name}({params}) {{
  constexpr int64_t C = {s.in_channels}, K = {s.out_channels}, H = {s.height}, W = {s.width};
  constexpr int64_t TH = {-(-s.height // 2)}, TW = {-(-s.width // 2)}, T = {s.tiles};
  #pragma omp parallel
  {{{steps}  }}
}}
"""


# One tile's position, and how many of its 2x2 outputs fall inside the image.
_TILE = "const int64_t n = t / (TH * TW), th = t / TW % TH, tw = t % TW;"
_EDGES = ("const int64_t rows = std::min<int64_t>(2, H - 2 * th), "
          "cols = std::min<int64_t>(2, W - 2 * tw);")


def _output(s: WinogradSpec, m: str, point_stride: str, k: str) -> str:
    """The output transform of one tile's 16 channels from `k` (m: their first point)."""
    bias = f"bias + {k}" if s.bias else "nullptr"
    other = f"other + at + {k}" if s.other else "nullptr"
    return (f"jo_wino_output<{str(s.relu).lower()}>({m}, {point_stride}, {bias}, {other}, "
            f"y + at + {k}, W * K, K, rows, cols);")


def _blocked_steps(s: WinogradSpec) -> str:
    """The three steps per block of tiles, u and m in the thread's own buffers."""
    tb, rows, cols = TILE_BLOCK, ROWS, COLUMNS
    return f"""
    static thread_local std::vector<float> u_buffer, m_buffer;
    u_buffer.resize(16 * {tb} * C);
    m_buffer.resize(16 * {tb} * {cols});
    float* u = u_buffer.data();
    float* m = m_buffer.data();
    #pragma omp for schedule(static)
    for (int64_t t0 = 0; t0 < T; t0 += {tb}) {{
      const int64_t tiles = std::min<int64_t>({tb}, T - t0);
      for (int64_t t = t0; t < t0 + tiles; ++t) {{
        {_TILE}
        for (int64_t c = 0; c < C; c += {LANES})
          jo_wino_input(x + n * H * W * C + c, H, W, C, 2 * th - 1, 2 * tw - 1,
                        u + (t - t0) * C + c, {tb} * C);
      }}
      for (int64_t kb = 0; kb < K; kb += {cols}) {{
        for (int64_t p = 0; p < 16; ++p)
          for (int64_t r = 0; r < tiles; r += {rows})
            jo_wino_gemm_tile(int(std::min<int64_t>({rows}, tiles - r)), u + (p * {tb} + r) * C,
                              w + p * C * K + kb, C, K, m + (p * {tb} + r) * {cols}, {cols});
        for (int64_t t = t0; t < t0 + tiles; ++t) {{
          {_TILE}
          {_EDGES}
          const int64_t at = ((n * H + 2 * th) * W + 2 * tw) * K;
          for (int64_t k = 0; k < {cols}; k += {LANES})
            {_output(s, f"m + (t - t0) * {cols} + k", f"{tb} * {cols}", "kb + k")}
        }}
      }}
    }}
"""


def _phased_steps(s: WinogradSpec) -> str:
    """Each step over all tiles in turn, in parallel, u and m in the launcher's scratch."""
    rows, cols = ROWS, COLUMNS
    return f"""
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {{
      {_TILE}
      for (int64_t c = 0; c < C; c += {LANES})
        jo_wino_input(x + n * H * W * C + c, H, W, C, 2 * th - 1, 2 * tw - 1, u + t * C + c,
                      T * C);
    }}
    #pragma omp for schedule(static) collapse(2)
    for (int64_t p = 0; p < 16; ++p) {{
      for (int64_t kb = 0; kb < K; kb += {cols}) {{
        for (int64_t t0 = 0; t0 < T; t0 += {rows})
          jo_wino_gemm_tile(int(std::min<int64_t>({rows}, T - t0)), u + (p * T + t0) * C,
                            w + p * C * K + kb, C, K, m + (p * T + t0) * K + kb, K);
      }}
    }}
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {{
      {_TILE}
      {_EDGES}
      const int64_t at = ((n * H + 2 * th) * W + 2 * tw) * K;
      for (int64_t k = 0; k < K; k += {LANES})
        {_output(s, "m + t * K + k", "T * K", "k")}
    }}
"""


WINOGRAD_PRELUDE = r"""
#include <algorithm>
#include <immintrin.h>
#include <vector>

// u[p] = (B^T d B)[p] for one 4x4 tile of 16 channels whose top-left input pixel is
// (h0, w0); pixels outside the image are zeros (the convolution's padding).
static inline void jo_wino_input(const float* x, int64_t H, int64_t W, int64_t C, int64_t h0,
                                 int64_t w0, float* u, int64_t point_stride) {
  __m512 d[4][4];
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 4; ++j) {
      const int64_t h = h0 + i, w = w0 + j;
      d[i][j] = (h >= 0 && h < H && w >= 0 && w < W) ? _mm512_loadu_ps(x + (h * W + w) * C)
                                                     : _mm512_setzero_ps();
    }
  }
  for (int j = 0; j < 4; ++j) {  // B^T d: rows
    const __m512 d0 = d[0][j], d1 = d[1][j], d2 = d[2][j], d3 = d[3][j];
    d[0][j] = _mm512_sub_ps(d0, d2);
    d[1][j] = _mm512_add_ps(d1, d2);
    d[2][j] = _mm512_sub_ps(d2, d1);
    d[3][j] = _mm512_sub_ps(d1, d3);
  }
  for (int i = 0; i < 4; ++i) {  // (B^T d) B: columns
    float* row = u + 4 * i * point_stride;
    _mm512_storeu_ps(row, _mm512_sub_ps(d[i][0], d[i][2]));
    _mm512_storeu_ps(row + point_stride, _mm512_add_ps(d[i][1], d[i][2]));
    _mm512_storeu_ps(row + 2 * point_stride, _mm512_sub_ps(d[i][2], d[i][1]));
    _mm512_storeu_ps(row + 3 * point_stride, _mm512_sub_ps(d[i][1], d[i][3]));
  }
}

// m[r][0:64] = sum_c u[r][c] * w[c][0:64] for `rows` (at most 6) rows, m's rows ldm apart,
// in registers: 24 accumulators and 4 weight vectors of the 32 (6 rows measured 1.1-1.4x
// faster than 4).
static inline void jo_wino_gemm_tile(int rows, const float* u, const float* w, int64_t C,
                                     int64_t K, float* m, int64_t ldm) {
  __m512 acc[6][4];
  #pragma GCC unroll 6
  for (int r = 0; r < 6; ++r)
    #pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; ++c) {
    __m512 b[4];
    #pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) b[q] = _mm512_loadu_ps(w + c * K + 16 * q);
    #pragma GCC unroll 6
    for (int r = 0; r < 6; ++r) {
      if (r >= rows) break;
      const __m512 a = _mm512_set1_ps(u[r * C + c]);
      #pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_fmadd_ps(a, b[q], acc[r][q]);
    }
  }
  for (int r = 0; r < rows; ++r)
    #pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) _mm512_storeu_ps(m + r * ldm + 16 * q, acc[r][q]);
}

// y = A^T m A for one tile and 16 output channels, + bias, + other, then ReLU; only the
// rows x cols outputs inside the image are stored.
template <bool relu>
static inline void jo_wino_output(const float* m, int64_t point_stride, const float* bias,
                                  const float* other, float* y, int64_t row_stride,
                                  int64_t pixel_stride, int64_t rows, int64_t cols) {
  __m512 v[4][4];
  for (int p = 0; p < 16; ++p) v[p / 4][p % 4] = _mm512_loadu_ps(m + p * point_stride);
  __m512 s[2][4];
  for (int j = 0; j < 4; ++j) {
    s[0][j] = _mm512_add_ps(_mm512_add_ps(v[0][j], v[1][j]), v[2][j]);
    s[1][j] = _mm512_sub_ps(_mm512_sub_ps(v[1][j], v[2][j]), v[3][j]);
  }
  const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  for (int64_t i = 0; i < rows; ++i) {
    __m512 o[2] = {_mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s[i][0], s[i][1]), s[i][2]), b),
                   _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s[i][1], s[i][2]), s[i][3]), b)};
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t at = i * row_stride + j * pixel_stride;
      __m512 out = other ? _mm512_add_ps(o[j], _mm512_loadu_ps(other + at)) : o[j];
      if (relu) out = _mm512_max_ps(_mm512_setzero_ps(), out);  // NaN stays NaN
      _mm512_storeu_ps(y + at, out);
    }
  }
}
"""
