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
from jitopt.ops import WEIGHT_BLOCK, blocked_linear_args

LINEAR_INT8_WEIGHT = torch.ops.jitopt.linear_int8_weight.default
LINEAR_INT4_WEIGHT = torch.ops.jitopt.linear_int4_weight.default
LINEAR_BLOCKED_WEIGHT = torch.ops.jitopt.linear_blocked_weight.default
OPS = (LINEAR_INT8_WEIGHT, LINEAR_INT4_WEIGHT, LINEAR_BLOCKED_WEIGHT)
# weight format -> (packed dtype, bytes per input channel of a block, C++ element type)
FORMATS = {"int8": (torch.int8, 64, "int8_t"), "int4": (torch.uint8, 32, "uint8_t"),
           "bfloat16": (torch.bfloat16, 128, "uint16_t"),
           "float16": (torch.float16, 128, "uint16_t")}
ROWS = 4  # rows of x per register tile
M_CHUNK = 64  # rows of x per parallel work item: a weight block is widened from cache 16 times


@dataclasses.dataclass(frozen=True)
class QuantizedLinearSpec:
    """What the kernel compiles in: input channels, output channels, a bias or not, the
    weight's format (a key of FORMATS) and, for int4, the group size."""

    k: int
    n: int
    bias: bool
    weight: str = "int8"
    group_size: int = 0


def quantized_linear_spec(node: fx.Node) -> QuantizedLinearSpec:
    """The spec of a `jitopt::linear_{int8,int4,half}_weight` node, or Declined."""
    group_size, params = 0, []
    if node.target is LINEAR_INT8_WEIGHT:
        x, weight, scale, bias = (list(node.args) + [None])[:4]
        n, params = operand_value(scale).shape[0], [scale]
    elif node.target is LINEAR_INT4_WEIGHT:
        x, weight, scale, offset, n, group_size, bias = (list(node.args) + [None])[:7]
        params = [scale, offset]
    elif node.target is LINEAR_BLOCKED_WEIGHT:
        x, weight, n, bias, activation = blocked_linear_args(node.args)
        if activation != "none":
            raise Declined(f"quantized-weight linear kernel: no {activation} epilogue")
    else:
        raise Declined(f"not a quantized-weight linear: {node.target}")
    # (the constants' meta may sit on the meta device)
    xv, wv = operand_value(x), operand_value(weight)
    if xv.device.type != "cpu":
        raise Declined("quantized-weight linear kernel: CPU tensors only")
    if xv.dtype != torch.float32 or xv.dim() != 2 or not isinstance(xv.shape[1], int):
        raise Declined("quantized-weight linear kernel: a float32 [M, K] x with static K")
    fmt = ("int8" if node.target is LINEAR_INT8_WEIGHT else
           "int4" if node.target is LINEAR_INT4_WEIGHT else str(wv.dtype).removeprefix("torch."))
    k, blocks = int(xv.shape[1]), -(-int(n) // WEIGHT_BLOCK)
    dtype, row_bytes, _ = FORMATS.get(fmt, (None, 0, ""))
    if tuple(wv.shape) != (blocks, k, row_bytes // wv.element_size()) or wv.dtype != dtype:
        raise Declined(f"quantized-weight linear kernel: weight {tuple(wv.shape)} "
                       f"{wv.dtype} is not packed for {n} output channels")
    if bias is not None and tuple(operand_value(bias).shape) != (int(n),):
        raise Declined(f"quantized-weight linear kernel: a bias of {n} values only")
    if any(operand_value(p).dtype != torch.float32 for p in params):
        raise Declined("quantized-weight linear kernel: float32 scales only")
    return QuantizedLinearSpec(k, int(n), bias is not None, fmt, int(group_size))


def operand_value(node: object) -> torch.Tensor:
    """The traced value of a quantized linear's tensor operand, or Declined."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise Declined(f"quantized-weight linear operand {node} is not a tensor")
    return val


def quantized_linear_node(gm: fx.GraphModule) -> fx.Node | None:
    """The quantized-weight linear of a partition quantized_linear_groups proposed, else None
    (a float32 blocked weight is cpp_float_linear.py's)."""
    for node in gm.graph.nodes:
        try:
            quantized_linear_spec(node)
        except Declined:
            continue
        return node
    return None


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

    node = next(n for n in gm.graph.nodes if n.target in OPS)
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
    """C++ for `name(x, w, [scale, [offset,]] [bias,] y, M)`; needs AVX-512F (and F16C)."""
    s = spec
    _, row_bytes, element = FORMATS[s.weight]
    params = ["const float* __restrict__ x", f"const {element}* __restrict__ w"]
    block = f"w + nb * K * {row_bytes // (2 if element == 'uint16_t' else 1)}"
    sizes = ""
    if s.weight == "int4":
        params += ["const float* __restrict__ scale", "const float* __restrict__ offset"]
        sizes = f", G = {s.group_size}, GROUPS = {-(-s.k // s.group_size)}"
        tile = (f"jo_w4_tile<{{rows}}>(x + m * K, K, {block}, K, G,\n"
                "            scale + nb * GROUPS * 64, offset + nb * GROUPS * 64,")
    else:
        params += ["const float* __restrict__ scale"] * (s.weight == "int8")
        scale = "scale + nb * 64" if s.weight == "int8" else "nullptr"
        tile = f"jo_wide_tile<{{rows}}, JO_{s.weight.upper()}>(x + m * K, K, {block}, K, {scale},"
    params += ["const float* __restrict__ bias"] * s.bias + ["float* __restrict__ y",
                                                              "int64_t M"]
    tail = f"{'bias + nb * 64' if s.bias else 'nullptr'}, y + m * N + nb * 64, N, cols);"
    lines = ",\n    ".join(", ".join(params[i:i + 2]) for i in range(0, len(params), 2))
    return f"""
extern "C" void {name}({lines}) {{
  constexpr int64_t K = {s.k}, N = {s.n}, BLOCKS = {-(-s.n // WEIGHT_BLOCK)}{sizes};
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

enum { JO_INT8, JO_BFLOAT16, JO_FLOAT16 };

// Sixteen weights widened to floats: int8 (sign-extended), bfloat16 (its bits are a float's
// top half) or float16 (F16C's conversion).
template <int FMT, typename T>
static inline __m512 jo_widen16(const T* w) {
  if constexpr (FMT == JO_INT8) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
  } else {
    const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    if constexpr (FMT == JO_BFLOAT16)
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    else
      return _mm512_cvtph_ps(half);
  }
}

// y[r][0:cols] = scale * sum_k x[r][k] * w[k][0:64] (+ bias) for ROWS rows: input channel k's
// 64 weights are widened to four float vectors once and used for every row (scale: int8's
// per-channel scales, or nullptr for none).
template <int ROWS, int FMT, typename T>
static inline void jo_wide_tile(const float* x, int64_t xs, const T* w, int64_t K,
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
    for (int c = 0; c < 4; ++c) wv[c] = jo_widen16<FMT>(w + k * 64 + 16 * c);
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
    const __m512 s = scale ? _mm512_maskz_loadu_ps(keep, scale + 16 * c) : _mm512_set1_ps(1.0f);
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
