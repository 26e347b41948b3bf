"""Linear layers over frozen weights to int8 x int8 matmuls (`quantize="int8"`)."""

from __future__ import annotations

import time

import torch
import torch.fx as fx

from jitopt.passes.constants import add_constant
from jitopt.passes.graph_facts import tensor_meta
from jitopt.passes.frozen_linears import CPU_AND_CUDA_LINEARS, frozen_linears, record_layer
from jitopt.passes.refresh_meta import set_meta

aten = torch.ops.aten
INT8_MAX = 127.0
# Scales below this are rounded up: an all-zero row or channel then quantizes to zeros
# instead of dividing by zero.
MIN_SCALE = 1e-12


def quantize_linear_int8(gm: fx.GraphModule) -> int:
    """Rewrites x @ W (+ b) with a frozen [K, N] weight (float32 on CPU; any float dtype on
    CUDA, computed around the product in float32) to dynamic per-token int8 activations times
    per-channel int8 weights: xq = round(x / sx), sx = amax|x row| / 127;
    wq and sw likewise per output channel, once; y = (xq @ wq) * sx * sw (+ b), the product
    in int32 (`torch._int_mm`, about 3.5x fp32's throughput here). Not exact: the error is
    the rounding of x and W to 255 levels, which jitopt reports per layer as the weight's
    SQNR (`quantized_layers` in explain). The scaling and rounding around the product are
    pointwise and row reductions, so they fuse into generated kernels. The int8 weight is
    stored in whichever memory order _int_mm measured faster at the example's shape (on CUDA
    column-major, cuBLASLt's int8 layout). Layers
    named in gm.meta["quantize_keep"] (an accuracy budget's verdict) stay fp32.
    Where gm.meta["activation_absmax"] gives a layer's per-input-channel max |x| (measured
    on the example inputs), x / s and W * s replace x and W (SmoothQuant, `smoothing_scales`):
    the same product in exact arithmetic, with x's outlier channels, which would coarsen every
    other channel's rounding, moved into W, whose per-channel scales absorb them."""
    rewrites = 0
    absmax = gm.meta.get("activation_absmax") or {}
    for node, x, weight, bias_node in frozen_linears(gm, accept=CPU_AND_CUDA_LINEARS):
        weight, out_dtype = weight.float(), tensor_meta(x).dtype
        smooth = smoothing_scales(absmax[node.name], weight) if node.name in absmax else None
        if smooth is not None:
            weight = weight * smooth  # [N, K] * [K]
            with gm.graph.inserting_before(node):
                x = _scaled(gm, x, 1.0 / smooth, node)
        wq, w_scale = quantize_per_channel(weight)  # [N, K] int8, [N]
        layout = ("NK" if wq.device.type == "cuda" else
                  faster_weight_layout(tensor_meta(x).shape[0], *wq.shape))
        wq_kn = wq.t() if layout == "NK" else wq.t().contiguous()  # [K, N], either memory order
        wq_node = add_constant(gm, wq_kn, node.name + "_int8", node)
        scale_node = add_constant(gm, w_scale, node.name + "_int8_scale", node)
        with gm.graph.inserting_before(node):
            out = _int8_linear(gm.graph, x, wq_node, scale_node, bias_node, out_dtype)
        out.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        record_layer(gm, node, weight, "int8",
                     weight_sqnr_db=round(weight_sqnr_db(weight, wq, w_scale), 2),
                     weight_layout=layout,
                     smoothing=f"SmoothQuant alpha={SMOOTHING_ALPHA}" if smooth is not None
                     else None)
        rewrites += 1
    return rewrites


# SmoothQuant's migration strength: how much of x's channel range moves into W (0.5 splits
# it evenly; MiniLM's cosine to fp32 goes from 0.9977 to 0.9993 with it, 0.999 at 0.7).
SMOOTHING_ALPHA = 0.5


def smoothing_scales(x_absmax: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per input channel k: s_k = max|x_k|^alpha / max|W_k|^(1 - alpha), for a [N, K]
    weight and x's measured [K] channel maxima (SmoothQuant, Xiao et al. 2023), but never
    below 1: x is only ever divided down. A channel the examples barely used (a ReLU output
    that was zero on all of them) would otherwise be multiplied by up to 1e4, and the first
    input that does use it has that one value set its row's int8 scale, rounding every other
    channel of the row to zero."""
    w_absmax = weight.abs().amax(dim=0)
    scales = (x_absmax.float().clamp_min(1e-5).pow(SMOOTHING_ALPHA)
              / w_absmax.clamp_min(1e-5).pow(1 - SMOOTHING_ALPHA))
    return scales.clamp(1.0, 1e4)


def _scaled(gm: fx.GraphModule, x: fx.Node, inverse: torch.Tensor, before: fx.Node) -> fx.Node:
    """x * inverse (a [K] constant broadcast over x's rows), with its meta."""
    const = add_constant(gm, inverse, before.name + "_smoothing", before)
    scaled = gm.graph.call_function(aten.mul.Tensor, (x, const))
    set_meta([scaled], tensor_meta(x).fake_mode)
    return scaled


# (rows, K, N) -> "NK" or "KN": which memory order of the int8 weight _int_mm multiplies
# faster at that shape, measured once per process (225 against 452 us either way round).
_LAYOUTS: dict[tuple[int, int, int], str] = {}


def faster_weight_layout(rows: object, n: int, k: int) -> str:
    """"NK" (rows of the [N, K] weight contiguous) or "KN", timed on random data of the
    example's shape; "NK" when the row count is symbolic."""
    if not isinstance(rows, int):
        return "NK"
    key = (rows, k, n)
    if key not in _LAYOUTS:
        x = torch.randint(-127, 128, (rows, k), dtype=torch.int8)
        w_nk = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        candidates = {"NK": w_nk.t(), "KN": w_nk.t().contiguous()}
        _LAYOUTS[key] = min(candidates,
                            key=lambda name: seconds(lambda: torch._int_mm(x, candidates[name])))
    return _LAYOUTS[key]


def seconds(fn, repeats: int = 3) -> float:
    """Wall time of `repeats` calls of `fn` after one warm-up call: for choosing between
    kernels once at compile time, on the example's shape."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return time.perf_counter() - start


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel (row) of an [N, K] weight: (int8 [N, K], scale [N])."""
    scale = (weight.abs().amax(dim=1) / INT8_MAX).clamp_min(MIN_SCALE)
    quantized = torch.round(weight / scale[:, None]).clamp(-INT8_MAX, INT8_MAX)
    return quantized.to(torch.int8).contiguous(), scale.to(torch.float32)


def weight_sqnr_db(weight: torch.Tensor, quantized: torch.Tensor, scale: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of the weight, in dB (higher is better)."""
    return sqnr_db(weight, quantized.float() * scale[:, None])


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """10 log10(|reference|^2 / |reference - approx|^2): how far below the signal the error
    of an approximation (a quantized weight) sits, in dB."""
    noise = (reference - approx).pow(2).sum().clamp_min(1e-30)
    return float(10 * torch.log10(reference.pow(2).sum() / noise))


def _int8_linear(graph: fx.Graph, x: fx.Node, wq: fx.Node, w_scale: fx.Node,
                 bias: fx.Node | None, out_dtype: torch.dtype) -> fx.Node:
    """y = _int_mm(round(x / sx), wq) * sx * sw (+ b), sx per row of x; wq is [K, N]. A
    half-precision x is widened first and y narrowed to `out_dtype`: the scales stay float32."""
    fake = tensor_meta(x)
    steps: list[fx.Node] = []

    def call(op, *args, **kwargs):
        node = graph.call_function(op, args, kwargs)
        steps.append(node)
        return node

    if fake.dtype != torch.float32:
        x = call(aten._to_copy.default, x, dtype=torch.float32)

    amax = call(aten.amax.default, call(aten.abs.default, x), [-1], True)  # [M, 1]
    x_scale = call(aten.div.Tensor, call(aten.clamp_min.default, amax, MIN_SCALE), INT8_MAX)
    rounded = call(aten.round.default, call(aten.div.Tensor, x, x_scale))
    clamped = call(aten.clamp.default, rounded, -INT8_MAX, INT8_MAX)
    xq = call(aten._to_copy.default, clamped, dtype=torch.int8)
    acc = call(aten._int_mm.default, xq, wq)  # [M, N] int32
    as_float = call(aten._to_copy.default, acc, dtype=torch.float32)
    out = call(aten.mul.Tensor, call(aten.mul.Tensor, as_float, x_scale), w_scale)
    if bias is not None:
        out = call(aten.add.Tensor, out, bias)
    if out_dtype != torch.float32:
        out = call(aten._to_copy.default, out, dtype=out_dtype)
    set_meta(steps, fake.fake_mode)
    return out

