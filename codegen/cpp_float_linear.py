"""The CPU target's kernel for `jitopt::linear_blocked_weight` over a float32 weight: a GEMM
that streams a frozen weight from memory while it computes.

Why our own: oneDNN's packed fp32 GEMM runs at its peak when the weight is in cache, but a
model's weights are not (GPT-2's 500 MB, the MLP benchmark's 64 MB, each read once per call),
and there it measured 15-40% slower (GPT-2's layers at 128 rows: 1.48 ms against 1.26 for
the same call with the weight in cache). This kernel prefetches the next piece of the weight
while it multiplies the current one, so the weight's memory traffic hides behind the
arithmetic: measured against oneDNN with the weights coming from memory, 1.3x on the MLP
benchmark's 32-row layers, 1.02-1.05x on GPT-2's at 128 rows, 1.2x at 1 row; at 1024 rows
(compute-bound), even.

Layout and order: the weight is [N / 64, K, 64] (jitopt/ops.py's pack_weight_blocks), so a
block of 64 output channels is one sequential stream. Each thread takes a contiguous range
of blocks; a block runs in chunks of KC input channels (a 128 KB piece of weight, which
stays in L2 while every 6-row tile of x multiplies it). While a chunk is in use, its tiles
prefetch the next chunk into L2, a share each. A tile sums its chunk in registers from
zero and then adds the sum to y: float32 sums of KC terms, added up chunk by chunk
(measured closer to a float64 product than oneDNN's).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

import jitopt.ops  # noqa: F401  (registers torch.ops.jitopt)
from jitopt.codegen.cpp_quantized_linear import operand_value
from jitopt.errors import Declined
from jitopt.ops import WEIGHT_BLOCK, blocked_linear_args

LINEAR_BLOCKED_WEIGHT = torch.ops.jitopt.linear_blocked_weight.default
ROWS = 6  # rows of x per register tile: 6 x 4 accumulators of the 32 AVX-512 registers
CHUNK = 512  # input channels per chunk (measured: 512 against 128 and 256, 1-6% faster)
# The op's activations (jitopt/ops.py's LINEAR_ACTIVATIONS) -> the prelude's template argument
ACTIVATIONS = {"none": "JO_ACT_NONE", "relu": "JO_ACT_RELU", "gelu": "JO_ACT_GELU",
               "gelu_tanh": "JO_ACT_GELU_TANH", "silu": "JO_ACT_SILU", "tanh": "JO_ACT_TANH",
               "sigmoid": "JO_ACT_SIGMOID"}


@dataclasses.dataclass(frozen=True)
class FloatLinearSpec:
    """What the kernel compiles in: input channels, output channels, a bias or not."""

    k: int
    n: int
    bias: bool
    activation: str = "none"  # a key of ACTIVATIONS, applied to y as it is stored


def float_linear_spec(node: fx.Node) -> FloatLinearSpec:
    """The spec of a `jitopt::linear_blocked_weight` node over a float32 weight, or Declined."""
    if node.target is not LINEAR_BLOCKED_WEIGHT:
        raise Declined(f"not a blocked-weight linear: {node.target}")
    x, weight, n, bias, activation = blocked_linear_args(node.args)
    xv, wv = operand_value(x), operand_value(weight)
    if xv.device.type != "cpu" or wv.dtype != torch.float32 or xv.dtype != torch.float32:
        raise Declined("float linear kernel: float32 CPU tensors only")
    if xv.dim() != 2 or not isinstance(xv.shape[1], int):
        raise Declined("float linear kernel: an [M, K] x with static K")
    if bias is not None and tuple(operand_value(bias).shape) != (int(n),):
        raise Declined(f"float linear kernel: a bias of {n} values only")
    if activation not in ACTIVATIONS:
        raise Declined(f"float linear kernel: no {activation!r} epilogue")
    k = int(xv.shape[1])
    if k == 0:
        raise Declined("float linear kernel: no input channels (y would be the bias alone)")
    if tuple(wv.shape) != (-(-int(n) // WEIGHT_BLOCK), k, WEIGHT_BLOCK):
        raise Declined(f"float linear kernel: weight {tuple(wv.shape)} is not packed for "
                       f"{n} output channels")
    return FloatLinearSpec(k, int(n), bias is not None, activation)


def float_linear_node(gm: fx.GraphModule) -> fx.Node | None:
    """The float32 blocked-weight linear of a partition float_linear_groups proposed."""
    return next((node for node in gm.graph.nodes if _runs(node)), None)


def float_linear_groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Each float32 blocked-weight linear, alone in its group."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return []  # written for AVX-512; elsewhere the op's ATen reference runs
    return [[node] for node in gm.graph.nodes if _runs(node)]


def _runs(node: fx.Node) -> bool:
    try:
        float_linear_spec(node)
    except Declined:
        return False
    return True


def render_float_linear(spec: FloatLinearSpec, name: str) -> str:
    """C++ for `name(x, w, [bias,] y, M)`; needs AVX-512F."""
    bias = "bias" if spec.bias else "nullptr"
    params = ("const float* __restrict__ x, const float* __restrict__ w, "
              + "const float* __restrict__ bias, " * spec.bias
              + "float* __restrict__ y, int64_t M")
    return f"""
extern "C" void {name}({params}) {{
  jo_float_linear<{spec.k}, {spec.n}, {ACTIVATIONS[spec.activation]}>(x, w, {bias}, y, M);
}}
"""


def _tile_cases() -> str:
    """One switch case per tile height: full tiles, then the last tile's remainder rows."""
    call = ("jo_float_tile<{r}>(x + m * K, K, block, k0, k1, ym, N, cols, block_bias, c == 0, "
            "pf, share); break;")
    return "\n".join(f"          {'default' if r == 1 else f'case {r}'}: " + call.format(r=r)
                     for r in range(ROWS, 0, -1))


FLOAT_LINEAR_PRELUDE = rf"""
#include <algorithm>
#include <immintrin.h>

// y[0:R][0:cols] (+)= x[0:R][k0:k1] @ w[k0:k1][0:64], rows K (x) and N (y) apart; the sum
// starts from zero in registers and is then added to y, or to the bias (or zero) when
// `first`. Meanwhile `lines` cache lines from `pf` are prefetched into L2, spread evenly.
template <int R>
static inline void jo_float_tile(const float* x, int64_t K, const float* w, int64_t k0,
                                 int64_t k1, float* y, int64_t N, int cols, const float* bias,
                                 bool first, const char* pf, int64_t lines) {{
  __m512 acc[R][4];
  #pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_setzero_ps();
  const int64_t per = (lines + (k1 - k0) - 1) / (k1 - k0);  // lines per step, rounded up
  int64_t line = 0;
  for (int64_t k = k0; k < k1; ++k) {{
    for (int64_t j = 0; j < per && line < lines; ++j, ++line)
      _mm_prefetch(pf + 64 * line, _MM_HINT_T1);
    __m512 b[4];
    #pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) b[q] = _mm512_loadu_ps(w + k * 64 + 16 * q);
    #pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {{
      const __m512 a = _mm512_set1_ps(x[r * K + k]);
      #pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_fmadd_ps(a, b[q], acc[r][q]);
    }}
  }}
  #pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {{
    // Lanes at or past `cols` are the block's padding: neither read nor written.
    const int lanes = std::max(0, std::min(16, cols - 16 * q));
    const __mmask16 keep = __mmask16((1u << lanes) - 1u);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(keep, bias + 16 * q) : _mm512_setzero_ps();
    #pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {{
      const __m512 base = first ? b : _mm512_maskz_loadu_ps(keep, y + r * N + 16 * q);
      _mm512_mask_storeu_ps(y + r * N + 16 * q, keep, _mm512_add_ps(base, acc[r][q]));
    }}
  }}
}}

enum {{ JO_ACT_NONE, JO_ACT_RELU, JO_ACT_GELU, JO_ACT_GELU_TANH, JO_ACT_SILU, JO_ACT_TANH,
       JO_ACT_SIGMOID }};

// The activations as the generated kernels compute them (codegen/lowering.py), per float
// (GELU(+inf) is +inf, as in eager's scalar path; eager's vectorized erf GELU gives NaN).
template <int ACT>
static inline float jo_activation(float v) {{
  if constexpr (ACT == JO_ACT_RELU) return v < 0.0f ? 0.0f : v;  // NaN stays NaN
  if constexpr (ACT == JO_ACT_GELU) return v * 0.5f * (1.0f + erff(v * 0.70710678118654752f));
  if constexpr (ACT == JO_ACT_GELU_TANH)
    return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * (v * (v * v)))));
  if constexpr (ACT == JO_ACT_SILU) return v * (1.0f / (1.0f + jo_expf(-v)));
  if constexpr (ACT == JO_ACT_TANH) return tanhf(v);
  if constexpr (ACT == JO_ACT_SIGMOID) return 1.0f / (1.0f + jo_expf(-v));
  return v;
}}

// The activation over a finished tile, in place while it is in L1 (vectorized through the
// prelude's SIMD declarations of erff and tanhf).
template <int ACT>
static inline void jo_activate(float* y, int64_t N, int64_t rows, int cols) {{
  for (int64_t r = 0; r < rows; ++r) {{
    float* row = y + r * N;
    #pragma omp simd
    for (int j = 0; j < cols; ++j) row[j] = jo_activation<ACT>(row[j]);
  }}
}}

// y [M, N] = act(x [M, K] @ w (+ bias)), w packed in blocks of 64 output channels
// [N / 64, K, 64].
template <int64_t K, int64_t N, int ACT>
static void jo_float_linear(const float* x, const float* w, const float* bias, float* y,
                            int64_t M) {{
  constexpr int64_t BLOCKS = (N + 63) / 64, KC = {CHUNK}, CHUNKS = (K + KC - 1) / KC;
  const int64_t tiles = (M + {ROWS - 1}) / {ROWS};
  #pragma omp parallel for schedule(static) if(M * N * K >= (1 << 18))
  for (int64_t nb = 0; nb < BLOCKS; ++nb) {{
    const float* block = w + nb * K * 64;
    const int cols = int(std::min<int64_t>(64, N - nb * 64));
    const float* block_bias = bias ? bias + nb * 64 : nullptr;
    for (int64_t c = 0; c < CHUNKS; ++c) {{
      const int64_t k0 = c * KC, k1 = std::min(K, k0 + KC);
      // The next chunk: this block's, else the next block's first (maybe another thread's:
      // one chunk prefetched in vain at the boundary).
      const float* next = c + 1 < CHUNKS ? block + k1 * 64
                          : nb + 1 < BLOCKS ? block + K * 64 : nullptr;
      const int64_t next_lines = next ? 4 * (c + 1 < CHUNKS ? std::min(K, k1 + KC) - k1
                                                             : std::min(K, KC)) : 0;
      int64_t issued = 0;
      for (int64_t t = 0; t < tiles; ++t) {{
        const int64_t m = t * {ROWS}, share = next_lines * (t + 1) / tiles - issued;
        const char* pf = reinterpret_cast<const char*>(next) + 64 * issued;
        float* ym = y + m * N + nb * 64;
        switch (std::min<int64_t>({ROWS}, M - m)) {{
{_tile_cases()}
        }}
        if (ACT != JO_ACT_NONE && c + 1 == CHUNKS)
          jo_activate<ACT>(ym, N, std::min<int64_t>({ROWS}, M - m), cols);
        issued += share;
      }}
    }}
  }}
}}
"""

