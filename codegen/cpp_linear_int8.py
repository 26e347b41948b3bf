"""A generated C++ kernel for `jitopt::linear_int8_weight` on the CPU target: a float32 x times
an int8 weight with per-output-channel scales, the weight read as int8.

Why our own: PyTorch's CPU weight-only int8 matmul (`aten._weight_int8pack_mm`) runs 10-100x
slower than the fp32 one here, and dequantizing to fp32 first reads and writes four times
the bytes the int8 weight has. This kernel widens each 64-byte row of a weight block to four
AVX-512 vectors of floats in registers and multiplies them into a 4-row x 64-column register
tile (decoding, one row of x, streams the weight once at memory speed; a prefill of many rows
reuses each widened weight vector for four rows and stays compute-bound). The packed layout
(jitopt/ops.py, [N / 64, K, 64]) makes every thread's reads one sequential stream.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

import jitopt.ops  # noqa: F401  (registers torch.ops.jitopt)
from jitopt.errors import Declined
from jitopt.ops import INT8_BLOCK

LINEAR_INT8_WEIGHT = torch.ops.jitopt.linear_int8_weight.default
ROWS = 4  # rows of x per register tile
M_CHUNK = 64  # rows of x per parallel work item: a weight block is widened from cache 16 times


@dataclasses.dataclass(frozen=True)
class LinearInt8Spec:
    """What the kernel compiles in: input channels, output channels, a bias or not."""

    k: int
    n: int
    bias: bool


def linear_int8_spec(node: fx.Node) -> LinearInt8Spec:
    """The spec of a `jitopt::linear_int8_weight` node, or Declined."""
    if node.target is not LINEAR_INT8_WEIGHT:
        raise Declined(f"not an int8-weight linear: {node.target}")
    x, weight, scale, bias = (list(node.args) + [None])[:4]
    vals = [n.meta.get("val") if isinstance(n, fx.Node) else None for n in (x, weight, scale)]
    if not all(isinstance(v, torch.Tensor) for v in vals):
        raise Declined("int8-weight linear kernel: tensor operands only")
    xv, wv, sv = vals  # (the constants' meta may sit on the meta device)
    if xv.device.type != "cpu":
        raise Declined("int8-weight linear kernel: CPU tensors only")
    if xv.dtype != torch.float32 or xv.dim() != 2 or not isinstance(xv.shape[1], int):
        raise Declined("int8-weight linear kernel: a float32 [M, K] x with static K")
    n = sv.shape[0]
    if wv.dtype != torch.int8 or tuple(wv.shape) != (-(-n // INT8_BLOCK), xv.shape[1],
                                                       INT8_BLOCK):
        raise Declined(f"int8-weight linear kernel: weight {tuple(wv.shape)} is not packed "
                       f"for {n} output channels")
    return LinearInt8Spec(int(xv.shape[1]), int(n), bias is not None)


def linear_int8_node(gm: fx.GraphModule) -> fx.Node | None:
    """The int8-weight linear of a partition linear_int8_groups proposed, else None."""
    return next((n for n in gm.graph.nodes if n.target is LINEAR_INT8_WEIGHT), None)


def linear_int8_groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Each int8-weight linear the kernel can run, alone in its group."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return []  # written for AVX-512; elsewhere the op's ATen reference runs
    groups = []
    for node in gm.graph.nodes:
        try:
            linear_int8_spec(node)
        except Declined:
            continue
        groups.append([node])
    return groups


def render_linear_int8_launcher(name: str, spec: LinearInt8Spec, gm: fx.GraphModule) -> str:
    """Python that makes x contiguous if it is not, allocates y [M, N] (or takes the memory
    plan's `out0` when its layout fits) and calls the kernel with M."""
    from jitopt.codegen.fusion_target import tensor_params

    node = linear_int8_node(gm)
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


def render_linear_int8(spec: LinearInt8Spec, name: str) -> str:
    """C++ for `name(x, w, scale, [bias,] y, M)`; needs AVX-512F."""
    s = spec
    bias_param = "const float* __restrict__ bias, " if s.bias else ""
    bias_block = "bias + nb * 64" if s.bias else "nullptr"
    return f"""
extern "C" void {name}(const float* __restrict__ x, const int8_t* __restrict__ w,
    const float* __restrict__ scale, {bias_param}float* __restrict__ y, int64_t M) {{
  constexpr int64_t K = {s.k}, N = {s.n}, BLOCKS = {-(-s.n // INT8_BLOCK)};
  const int64_t chunks = (M + {M_CHUNK - 1}) / {M_CHUNK};
  #pragma omp parallel for collapse(2) schedule(static) if(M * N * K >= (1 << 18))
  for (int64_t nb = 0; nb < BLOCKS; ++nb) {{
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {{
      const int8_t* wb = w + nb * K * 64;
      const int cols = int(std::min<int64_t>(64, N - nb * 64));
      const int64_t end = std::min<int64_t>(M, (chunk + 1) * {M_CHUNK});
      int64_t m = chunk * {M_CHUNK};
      for (; m + {ROWS} <= end; m += {ROWS})
        jo_w8_tile<{ROWS}>(x + m * K, K, wb, K, scale + nb * 64, {bias_block}, y + m * N + nb * 64,
                        N, cols);
      for (; m < end; ++m)
        jo_w8_tile<1>(x + m * K, K, wb, K, scale + nb * 64, {bias_block}, y + m * N + nb * 64,
                      N, cols);
    }}
  }}
}}
"""


LINEAR_INT8_PRELUDE = r"""
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
"""
