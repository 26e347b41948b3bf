"""Generated C++ kernels for `jitopt::linear_int8_weight` and `jitopt::linear_int4_weight` on
the CPU target: a float32 x times an int8 (per-channel scales) or 4-bit (per-group scales and
offsets) weight, the weight read in its packed form.

Why our own: PyTorch's CPU weight-only int8 matmul (`aten._weight_int8pack_mm`) runs 10-100x
slower than the fp32 one here, and dequantizing to fp32 first reads and writes four times
the bytes the int8 weight has. This kernel widens each 64-byte row of a weight block to four
AVX-512 vectors of floats in registers and multiplies them into a 4-row x 64-column register
tile (decoding, one row of x, streams the weight once at memory speed; a prefill of many rows
reuses each widened weight vector for four rows and stays compute-bound). The packed layouts
(jitopt/ops.py, [N / 64, K, 64] bytes or [N / 64, K, 32] for 4 bits) make every thread's
reads one sequential stream. A 4-bit weight is widened and then mapped through its group's
scale and offset (one FMA per vector) before the same register tile.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

import jitopt.ops  # noqa: F401  (registers torch.ops.jitopt)
from jitopt.errors import Declined
from jitopt.ops import INT8_BLOCK

LINEAR_INT8_WEIGHT = torch.ops.jitopt.linear_int8_weight.default
LINEAR_INT4_WEIGHT = torch.ops.jitopt.linear_int4_weight.default
ROWS = 4  # rows of x per register tile
M_CHUNK = 64  # rows of x per parallel work item: a weight block is widened from cache 16 times


@dataclasses.dataclass(frozen=True)
class QuantizedLinearSpec:
    """What the kernel compiles in: input channels, output channels, a bias or not; for 4-bit
    weights (bits=4) the group size."""

    k: int
    n: int
    bias: bool
    bits: int = 8
    group_size: int = 0


def quantized_linear_spec(node: fx.Node) -> QuantizedLinearSpec:
    """The spec of a `jitopt::linear_int8_weight` or `linear_int4_weight` node, or Declined."""
    if node.target is LINEAR_INT8_WEIGHT:
        x, weight, scale, bias = (list(node.args) + [None])[:4]
        bits, n, group_size, params = 8, _val(scale).shape[0], 0, [scale]
    elif node.target is LINEAR_INT4_WEIGHT:
        x, weight, scale, offset, n, group_size, bias = (list(node.args) + [None])[:7]
        bits, params = 4, [scale, offset]
    else:
        raise Declined(f"not a quantized-weight linear: {node.target}")
    xv, wv = _val(x), _val(weight)  # (the constants' meta may sit on the meta device)
    if xv.device.type != "cpu":
        raise Declined("quantized-weight linear kernel: CPU tensors only")
    if xv.dtype != torch.float32 or xv.dim() != 2 or not isinstance(xv.shape[1], int):
        raise Declined("quantized-weight linear kernel: a float32 [M, K] x with static K")
    k, blocks = int(xv.shape[1]), -(-int(n) // INT8_BLOCK)
    packed = (blocks, k, INT8_BLOCK * bits // 8)
    if tuple(wv.shape) != packed or wv.dtype != (torch.int8 if bits == 8 else torch.uint8):
        raise Declined(f"quantized-weight linear kernel: weight {tuple(wv.shape)} "
                       f"{wv.dtype} is not packed for {n} output channels")
    if any(_val(p).dtype != torch.float32 for p in params):
        raise Declined("quantized-weight linear kernel: float32 scales only")
    return QuantizedLinearSpec(k, int(n), bias is not None, bits, int(group_size))


def _val(node: object) -> torch.Tensor:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise Declined(f"quantized-weight linear operand {node} is not a tensor")
    return val


def quantized_linear_node(gm: fx.GraphModule) -> fx.Node | None:
    """The quantized-weight linear of a partition quantized_linear_groups proposed, else None."""
    return next((n for n in gm.graph.nodes
                 if n.target in (LINEAR_INT8_WEIGHT, LINEAR_INT4_WEIGHT)), None)


def quantized_linear_groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Each quantized-weight linear a kernel can run, alone in its group."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return []  # written for AVX-512; elsewhere the op's ATen reference runs
    groups = []
    for node in gm.graph.nodes:
        try:
            quantized_linear_spec(node)
        except Declined:
            continue
        groups.append([node])
    return groups


def render_quantized_linear_launcher(name: str, spec: QuantizedLinearSpec, gm: fx.GraphModule) -> str:
    """Python that makes x contiguous if it is not, allocates y [M, N] (or takes the memory
    plan's `out0` when its layout fits) and calls the kernel with M."""
    from jitopt.codegen.fusion_target import tensor_params

    node = quantized_linear_node(gm)
    params, _ = tensor_params(gm)
    operands = [a.name for a in node.args if isinstance(a, fx.Node)]
    x = operands[0]
    lines = [f"def {name}({', '.join(params + ['out0=None'])}):"]
    for arg in operands:  # the kernel indexes every operand as contiguous
        lines += [f"    if not {arg}.is_contiguous():", f"        {arg} = {arg}.contiguous()"]
    lines += [f"    m = {x}.shape[0]",
              f"    if out0 is None or out0.shape != (m, {spec.n}) or not out0.is_contiguous():",
              f"        out0 = empty_strided((m, {spec.n}), ({spec.n}, 1), dtype=torch.float32)",
              f"    kernel({', '.join(f'{a}.data_ptr()' for a in operands)}, out0.data_ptr(), m)",
              "    return out0"]
    return "\n".join(lines) + "\n"


def render_quantized_linear(spec: QuantizedLinearSpec, name: str) -> str:
    """C++ for `name(x, w, scale, [offset,] [bias,] y, M)`; needs AVX-512F."""
    s = spec
    params = ["const float* __restrict__ x"]
    if s.bits == 8:
        params += ["const int8_t* __restrict__ w", "const float* __restrict__ scale"]
        sizes = ""
        tile = "jo_w8_tile<{rows}>(x + m * K, K, w + nb * K * 64, K, scale + nb * 64,"
    else:
        params += ["const uint8_t* __restrict__ w", "const float* __restrict__ scale",
                   "const float* __restrict__ offset"]
        sizes = f", G = {s.group_size}, GROUPS = {-(-s.k // s.group_size)}"
        tile = ("jo_w4_tile<{rows}>(x + m * K, K, w + nb * K * 32, K, G,\n"
                "            scale + nb * GROUPS * 64, offset + nb * GROUPS * 64,")
    params += ["const float* __restrict__ bias"] * s.bias + ["float* __restrict__ y",
                                                              "int64_t M"]
    tail = f"{'bias + nb * 64' if s.bias else 'nullptr'}, y + m * N + nb * 64, N, cols);"
    lines = ",\n    ".join(", ".join(params[i:i + 2]) for i in range(0, len(params), 2))
    return f"""
extern "C" void {name}({lines}) {{
  constexpr int64_t K = {s.k}, N = {s.n}, BLOCKS = {-(-s.n // INT8_BLOCK)}{sizes};
  const int64_t chunks = (M + {M_CHUNK - 1}) / {M_CHUNK};
  #pragma omp parallel for collapse(2) schedule(static) if(M * N * K >= (1 << 18))
  for (int64_t nb = 0; nb < BLOCKS; ++nb) {{
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {{
      const int cols = int(std::min<int64_t>(64, N - nb * 64));
      const int64_t end = std::min<int64_t>(M, (chunk + 1) * {M_CHUNK});
      int64_t m = chunk * {M_CHUNK};
      for (; m + {ROWS} <= end; m += {ROWS})
        {tile.format(rows=ROWS)}
            {tail}
      for (; m < end; ++m)
        {tile.format(rows=1)}
            {tail}
    }}
  }}
}}
"""


QUANTIZED_LINEAR_PRELUDE = r"""
#include <algorithm>
#include <immintrin.h>

// y[r][0:cols] = scale * sum_k x[r][k] * w[k][0:64] (+ bias) for ROWS rows: the weight's 64
// int8 of input channel k are widened to four float vectors once and used for every row.
template <int ROWS>
static inline void jo_w8_tile(const float* x, int64_t xs, const int8_t* w, int64_t K,
                              const float* scale, const float* bias, float* y, int64_t ys,
                              int cols) {
  __m512 acc[ROWS][4];
  #pragma GCC unroll 4
  for (int r = 0; r < ROWS; ++r)
    #pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 wv[4];
    #pragma GCC unroll 4
    for (int c = 0; c < 4; ++c)
      wv[c] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k * 64 + 16 * c))));
    #pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * xs + k]);
      #pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(xb, wv[c], acc[r][c]);
    }
  }
  #pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    // Lanes at or past `cols` are padding: neither read (scale, bias) nor written (y).
    const int lanes = std::max(0, std::min(16, cols - 16 * c));
    const __mmask16 keep = __mmask16((1u << lanes) - 1u);
    const __m512 s = _mm512_maskz_loadu_ps(keep, scale + 16 * c);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(keep, bias + 16 * c) : _mm512_setzero_ps();
    #pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r)
      _mm512_mask_storeu_ps(y + r * ys + 16 * c, keep, _mm512_fmadd_ps(acc[r][c], s, b));
  }
}

// The same for 4-bit codes: input channel k's 32 bytes hold channels j (low nibble) and
// j + 32 (high); each widened code becomes code * scale + offset of its group, then the tile.
template <int ROWS>
static inline void jo_w4_tile(const float* x, int64_t xs, const uint8_t* w, int64_t K,
                              int64_t G, const float* scale, const float* offset,
                              const float* bias, float* y, int64_t ys, int cols) {
  __m512 acc[ROWS][4];
  #pragma GCC unroll 4
  for (int r = 0; r < ROWS; ++r)
    #pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  const __m256i nibble = _mm256_set1_epi8(15);
  for (int64_t g0 = 0, g = 0; g0 < K; g0 += G, ++g) {
    __m512 gs[4], go[4];
    #pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      gs[c] = _mm512_loadu_ps(scale + g * 64 + 16 * c);
      go[c] = _mm512_loadu_ps(offset + g * 64 + 16 * c);
    }
    const int64_t g1 = std::min(K, g0 + G);
    for (int64_t k = g0; k < g1; ++k) {
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 32));
      const __m256i lo = _mm256_and_si256(bytes, nibble);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
      const __m128i quarter[4] = {_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1),
                                  _mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)};
      __m512 wv[4];
      #pragma GCC unroll 4
      for (int c = 0; c < 4; ++c)
        wv[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(quarter[c])), gs[c],
                                go[c]);
      #pragma GCC unroll 4
      for (int r = 0; r < ROWS; ++r) {
        const __m512 xb = _mm512_set1_ps(x[r * xs + k]);
        #pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(xb, wv[c], acc[r][c]);
      }
    }
  }
  #pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    const int lanes = std::max(0, std::min(16, cols - 16 * c));
    const __mmask16 keep = __mmask16((1u << lanes) - 1u);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(keep, bias + 16 * c) : _mm512_setzero_ps();
    #pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r)
      _mm512_mask_storeu_ps(y + r * ys + 16 * c, keep, _mm512_add_ps(acc[r][c], b));
  }
}
"""
