"""A generated C++ attention kernel for the CPU target: softmax(q k^T * scale + mask) v.

Why our own: ATen's CPU flash attention runs its block products through MKL, which on this
AMD CPU picks an AVX2 path: 130 GFLOP/s on BERT's shapes, 11% of BERT's forward. Scores for
a short sequence fit in L1 (a block of 6 query rows x 1024 keys is 24 KB), so no online
softmax is needed: per (batch, head) the kernel packs k^T once, then for each block of 6
query rows computes the scores with a 6x64 AVX-512 register tile (24 accumulators: 15-25%
faster than 4 rows on BERT's and GPT-2's shapes), takes the softmax in place and multiplies
by v with the same tile. Shapes, strides and the scale are compiled in.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence

import torch
import torch.fx as fx

from jitopt.errors import Declined

aten = torch.ops.aten
SDPA_CPU = aten._scaled_dot_product_flash_attention_for_cpu.default
MAX_KEYS = 1024  # a 6-row score block of this many keys is 24 KB: stays in L1
ROWS = 6  # query rows per register tile
LANES = 16  # floats per AVX-512 vector


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """One attention call's static layout: q [B, H, SQ, D], k and v [B, H, SK, D], out like
    q, an optional additive mask broadcast to [B, H, SQ, SK]; strides in elements."""

    batch: int
    heads: int
    queries: int
    keys: int
    dim: int
    q_strides: tuple[int, ...]
    k_strides: tuple[int, ...]
    v_strides: tuple[int, ...]
    out_strides: tuple[int, ...]
    mask_strides: tuple[int, ...] | None
    scale: float
    causal: bool


def attention_spec(node: fx.Node) -> AttentionSpec:
    """The spec of a `_scaled_dot_product_flash_attention_for_cpu` node, or Declined."""
    if node.target is not SDPA_CPU:
        raise Declined(f"not CPU flash attention: {node.target}")
    q, k, v, dropout, causal = (list(node.args) + [0.0, False])[:5]
    mask, scale = node.kwargs.get("attn_mask"), node.kwargs.get("scale")
    if dropout != 0.0 or len(node.args) > 5 or set(node.kwargs) - {"attn_mask", "scale"}:
        raise Declined("attention with dropout or other options")
    vals = [_val(x) for x in (q, k, v)]
    out = node.meta.get("val")
    out = out[0] if isinstance(out, (tuple, list)) else None
    if out is None or any(t.dtype != torch.float32 or t.device.type != "cpu"
                          for t in (*vals, out)):
        raise Declined("attention kernel: float32 CPU tensors only")
    if any(t.dim() != 4 or not _static(t) for t in (*vals, out)):
        raise Declined("attention kernel: static [B, H, S, D] tensors only")
    qv, kv, vv = vals
    b, h, sq, d = qv.shape
    sk = kv.shape[2]
    if tuple(kv.shape) != (b, h, sk, d) or tuple(vv.shape) != (b, h, sk, d):
        raise Declined("attention kernel: q, k, v of different batch, heads or head size")
    if d % LANES or sk > MAX_KEYS or any(t.stride(3) != 1 for t in (*vals, out)):
        raise Declined(f"attention kernel: head size a multiple of {LANES}, at most "
                       f"{MAX_KEYS} keys, contiguous head dim")
    mask_strides = None if mask is None else _mask_strides(_val(mask), (b, h, sq, sk))
    return AttentionSpec(b, h, sq, sk, d, tuple(qv.stride()), tuple(kv.stride()),
                         tuple(vv.stride()), tuple(out.stride()), mask_strides,
                         1.0 / math.sqrt(d) if scale is None else float(scale), bool(causal))


def _val(node: object) -> torch.Tensor:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise Declined(f"attention operand {node} is not a tensor")
    return val


def _static(t: torch.Tensor) -> bool:
    return all(isinstance(s, int) for s in (*t.shape, *t.stride(), t.storage_offset()))


def _mask_strides(mask: torch.Tensor, scores: Sequence[int]) -> tuple[int, ...]:
    """The mask's strides as read at a [B, H, SQ, SK] index (0 where it broadcasts)."""
    if mask.dtype != torch.float32 or not _static(mask) or mask.dim() > 4:
        raise Declined("attention kernel: an additive float32 mask of static shape only")
    lead = 4 - mask.dim()
    strides = []
    for d, size in enumerate(scores):
        m = d - lead
        if m < 0 or mask.shape[m] == 1:
            strides.append(0)
        elif mask.shape[m] == size:
            strides.append(mask.stride(m))
        else:
            raise Declined(f"attention mask {tuple(mask.shape)} does not broadcast to "
                           f"{tuple(scores)}")
    return tuple(strides)


def attention_node(gm: fx.GraphModule) -> fx.Node | None:
    """The attention call of a partition attention_groups proposed, else None."""
    return next((n for n in gm.graph.nodes if n.target is SDPA_CPU), None)


def attention_groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Each CPU attention call the kernel can run, with the getitem reading its output (its
    log-sum-exp, an output for training, must be unused)."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return []  # the kernel is written for AVX-512; elsewhere ATen's stays
    groups = []
    for node in gm.graph.nodes:
        if node.target is not SDPA_CPU or not all(
                u.target is operator.getitem and u.args[1] == 0 for u in node.users):
            continue
        try:
            attention_spec(node)
        except Declined:
            continue
        groups.append([node, *node.users])
    return groups


def render_attention_launcher(name: str, spec: AttentionSpec, gm: fx.GraphModule) -> str:
    """Python that checks the operands' layouts (compiled in), allocates the output (or takes
    the memory plan's `out0`) and calls the kernel."""
    from jitopt.codegen.fusion_target import layout_check, size_tuple, tensor_params

    node = attention_node(gm)
    params, _ = tensor_params(gm)
    operands = [node.args[0], node.args[1], node.args[2]]
    if spec.mask_strides is not None:
        operands.append(node.kwargs["attn_mask"])
    lines = [f"def {name}({', '.join(params + ['out0=None'])}):"]
    for operand in operands:
        val = operand.meta["val"]
        lines += layout_check(operand.name, tuple(val.shape), tuple(val.stride()))
    shape, strides = attention_output_layout(spec)
    # A buffer the memory plan hands over must have the layout the kernel writes (checked:
    # one that came from ATen ops while kernels were building may not).
    lines += [f"    if out0 is not None and (out0.shape != {size_tuple(shape)} or "
              f"out0.stride() != {size_tuple(strides)}):", "        out0 = None",
              "    if out0 is None:",
              f"        out0 = empty_strided({size_tuple(shape)}, {size_tuple(strides)}, "
              "dtype=torch.float32)",
              f"    kernel({', '.join(f'{o.name}.data_ptr()' for o in operands)}, "
              "out0.data_ptr())",
              "    return out0"]
    return "\n".join(lines) + "\n"


def attention_output_layout(spec: AttentionSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return (spec.batch, spec.heads, spec.queries, spec.dim), spec.out_strides


def render_attention(spec: AttentionSpec, name: str) -> str:
    """C++ for `name(q, k, v, [mask,] out)`; needs AVX-512F (see cpp_compiler.has_avx512)."""
    s = spec
    padded = -(-s.keys // LANES) * LANES
    mask_param = "const float* __restrict__ mask, " if s.mask_strides else ""
    mask_row = (f"mask + b * {s.mask_strides[0]} + h * {s.mask_strides[1]} + "
                f"(i0 + r) * {s.mask_strides[2]}" if s.mask_strides else "nullptr")
    mask_col = s.mask_strides[3] if s.mask_strides else 0
    # Causal as torch defines it: query i sees keys j <= i (top-left aligned).
    visible = "std::min<int64_t>(SK, i0 + r + 1)" if s.causal else "SK"
    block_keys = "std::min<int64_t>(SK, i0 + rows)" if s.causal else "SK"
    return f"""
extern "C" void {name}(const float* __restrict__ q, const float* __restrict__ k,
    const float* __restrict__ v, {mask_param}float* __restrict__ out) {{
  constexpr int64_t B = {s.batch}, H = {s.heads}, SQ = {s.queries}, SK = {s.keys}, D = {s.dim};
  constexpr int64_t SKP = {padded};  // keys rounded up to whole vectors
  #pragma omp parallel for schedule(static) if(B * H > 1)
  for (int64_t bh = 0; bh < B * H; ++bh) {{
    const int64_t b = bh / H, h = bh % H;
    const float* qh = q + b * {s.q_strides[0]} + h * {s.q_strides[1]};
    const float* kh = k + b * {s.k_strides[0]} + h * {s.k_strides[1]};
    const float* vh = v + b * {s.v_strides[0]} + h * {s.v_strides[1]};
    float* oh = out + b * {s.out_strides[0]} + h * {s.out_strides[1]};
    alignas(64) float kt[D * SKP];  // k^T, so a score row is a sum of k^T rows
    for (int64_t d = 0; d < D; ++d) {{
      for (int64_t j = 0; j < SK; ++j) kt[d * SKP + j] = kh[j * {s.k_strides[2]} + d];
      for (int64_t j = SK; j < SKP; ++j) kt[d * SKP + j] = 0.0f;
    }}
    alignas(64) float p[{ROWS} * SKP];
    for (int64_t i0 = 0; i0 < SQ; i0 += {ROWS}) {{
      const int rows = int(std::min<int64_t>({ROWS}, SQ - i0));
      const int64_t keys = {block_keys};
      const int64_t key_vectors = (keys + {LANES - 1}) / {LANES};
      jo_attn_scores(rows, qh + i0 * {s.q_strides[2]}, {s.q_strides[2]}, kt, SKP, D, key_vectors,
                     p);
      float inv_sum[{ROWS}];
      for (int r = 0; r < rows; ++r) {{
        const float* mrow = {mask_row};
        inv_sum[r] = jo_attn_softmax<{mask_col}>(p + r * SKP, {visible}, key_vectors * {LANES},
                                                float({s.scale!r}), mrow);
      }}
      jo_attn_values(rows, p, SKP, keys, vh, {s.v_strides[2]}, D, inv_sum,
                     oh + i0 * {s.out_strides[2]}, {s.out_strides[2]});
    }}
  }}
}}
"""


ATTENTION_PRELUDE = r"""
#include <algorithm>
#include <immintrin.h>

// rows x (16 * NV) scores of one 6-row block: p[r][j] = sum_d q[r][d] * kt[d][j], in
// registers (24 accumulators), k^T rows streamed from L1.
template <int NV>
static inline void jo_attn_scores_tile(int rows, const float* q, int64_t qs, const float* kt,
                                       int64_t ktn, int64_t dim, float* p) {
  __m512 acc[6][NV];
  #pragma GCC unroll 6
  for (int r = 0; r < 6; ++r)
    #pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; ++d) {
    __m512 kv[NV];
    #pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) kv[c] = _mm512_load_ps(kt + d * ktn + 16 * c);
    #pragma GCC unroll 6
    for (int r = 0; r < 6; ++r) {
      if (r >= rows) break;
      const __m512 qb = _mm512_set1_ps(q[r * qs + d]);
      #pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(qb, kv[c], acc[r][c]);
    }
  }
  #pragma GCC unroll 6
  for (int r = 0; r < 6; ++r) {
    if (r >= rows) break;
    #pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) _mm512_store_ps(p + r * ktn + 16 * c, acc[r][c]);
  }
}

static inline void jo_attn_scores(int rows, const float* q, int64_t qs, const float* kt,
                                  int64_t ktn, int64_t dim, int64_t key_vectors, float* p) {
  for (int64_t c = 0; c < key_vectors;) {
    if (key_vectors - c >= 4) {
      jo_attn_scores_tile<4>(rows, q, qs, kt + 16 * c, ktn, dim, p + 16 * c);
      c += 4;
    } else {
      jo_attn_scores_tile<1>(rows, q, qs, kt + 16 * c, ktn, dim, p + 16 * c);
      c += 1;
    }
  }
}

// Softmax of one score row in place over its `visible` keys (zeros up to `width`, so the
// value product may run over whole vectors); returns 1 / sum. A row with every key masked
// to -inf gives zeros, as ATen's flash attention does.
template <int64_t mask_stride>
static inline float jo_attn_softmax(float* p, int64_t visible, int64_t width, float scale,
                                    const float* mask) {
  float mx = -std::numeric_limits<float>::infinity();
  if (mask) {
    #pragma omp simd reduction(max:mx)
    for (int64_t j = 0; j < visible; ++j) {
      const float s = p[j] * scale + mask[j * mask_stride];
      p[j] = s;
      mx = s > mx ? s : mx;  // a NaN score still makes the row NaN, through exp below
    }
  } else {
    #pragma omp simd reduction(max:mx)
    for (int64_t j = 0; j < visible; ++j) {
      const float s = p[j] * scale;
      p[j] = s;
      mx = s > mx ? s : mx;
    }
  }
  if (mx == -std::numeric_limits<float>::infinity()) {
    for (int64_t j = 0; j < width; ++j) p[j] = 0.0f;
    return 0.0f;
  }
  float sum = 0.0f;
  #pragma omp simd reduction(+:sum)
  for (int64_t j = 0; j < visible; ++j) {
    const float e = jo_expf(p[j] - mx);
    p[j] = e;
    sum += e;
  }
  for (int64_t j = visible; j < width; ++j) p[j] = 0.0f;
  return 1.0f / sum;
}

// out[r][:] = inv_sum[r] * sum_j p[r][j] * v[j][:], 6 rows x (16 * NV) columns per tile.
template <int NV>
static inline void jo_attn_values_tile(int rows, const float* p, int64_t pn, int64_t keys,
                                       const float* v, int64_t vs, const float* inv_sum,
                                       float* out, int64_t os) {
  __m512 acc[6][NV];
  #pragma GCC unroll 6
  for (int r = 0; r < 6; ++r)
    #pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < keys; ++j) {
    __m512 vv[NV];
    #pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) vv[c] = _mm512_loadu_ps(v + j * vs + 16 * c);
    #pragma GCC unroll 6
    for (int r = 0; r < 6; ++r) {
      if (r >= rows) break;
      const __m512 pb = _mm512_set1_ps(p[r * pn + j]);
      #pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(pb, vv[c], acc[r][c]);
    }
  }
  #pragma GCC unroll 6
  for (int r = 0; r < 6; ++r) {
    if (r >= rows) break;
    const __m512 scale = _mm512_set1_ps(inv_sum[r]);
    #pragma GCC unroll 4
    for (int c = 0; c < NV; ++c)
      _mm512_storeu_ps(out + r * os + 16 * c, _mm512_mul_ps(acc[r][c], scale));
  }
}

static inline void jo_attn_values(int rows, const float* p, int64_t pn, int64_t keys,
                                  const float* v, int64_t vs, int64_t dim,
                                  const float* inv_sum, float* out, int64_t os) {
  int64_t c = 0;
  for (; c + 64 <= dim; c += 64)
    jo_attn_values_tile<4>(rows, p, pn, keys, v + c, vs, inv_sum, out + c, os);
  for (; c < dim; c += 16)
    jo_attn_values_tile<1>(rows, p, pn, keys, v + c, vs, inv_sum, out + c, os);
}
"""
