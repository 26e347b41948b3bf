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
    pointwise and row reductions, so they fuse into generated kernels. The product runs on
    whichever kernel measured fastest at the example's shape (`fastest_int8_kernel`): _int_mm
    with the int8 weight in either memory order, or oneDNN's u8 x s8 linear over a packed
    weight (on CUDA, _int_mm with a column-major weight, cuBLASLt's int8 layout). Layers
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
        rows = tensor_meta(x).shape[0]
        kernel = "int_mm NK" if wq.device.type == "cuda" else fastest_int8_kernel(rows, *wq.shape)
        scale_node = add_constant(gm, w_scale, node.name + "_int8_scale", node)
        if kernel == ONEDNN:
            packed = add_constant(gm, torch.ops.onednn.qlinear_prepack(wq, [rows, wq.shape[1]]),
                                  node.name + "_int8_packed", node)
            out = _onednn_int8_linear(gm, node, x, packed, scale_node, bias_node)
        else:
            wq_kn = wq.t() if kernel == "int_mm NK" else wq.t().contiguous()  # [K, N]
            wq_node = add_constant(gm, wq_kn, node.name + "_int8", node)
            with gm.graph.inserting_before(node):
                out = _int8_linear(gm.graph, x, wq_node, scale_node, bias_node, out_dtype)
        out.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        record_layer(gm, node, weight, "int8",
                     weight_sqnr_db=round(weight_sqnr_db(weight, wq, w_scale), 2),
                     kernel=kernel,
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


ONEDNN = "onednn"
# (rows, K, N) -> the int8 product measured fastest at that shape, once per process:
# "int_mm NK" / "int_mm KN" (torch._int_mm, the [K, N] weight column- or row-major: 225
# against 452 us either way round) or ONEDNN (onednn.qlinear_pointwise, u8 x s8: 160 us
# against _int_mm's 204-242 at the benchmark MLP's 32 x 1024 x 4096, slower at 8 rows).
_KERNELS: dict[tuple[int, int, int], str] = {}


def fastest_int8_kernel(rows: object, n: int, k: int) -> str:
    """The fastest int8 x int8 product of [rows, K] by [K, N] here, timed on random data;
    "int_mm NK" when the row count is symbolic."""
    if not isinstance(rows, int):
        return "int_mm NK"
    key = (rows, k, n)
    if key not in _KERNELS:
        x = torch.randint(-127, 128, (rows, k), dtype=torch.int8)
        w_nk = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        candidates = {"int_mm NK": lambda w=w_nk.t(): torch._int_mm(x, w),
                      "int_mm KN": lambda w=w_nk.t().contiguous(): torch._int_mm(x, w)}
        onednn = _onednn_int8_product(x, w_nk)
        if onednn is not None:
            candidates[ONEDNN] = onednn
        _KERNELS[key] = min(candidates, key=lambda name: _seconds_or_inf(candidates[name]))
    return _KERNELS[key]


def _seconds_or_inf(fn) -> float:
    """A candidate that fails at this shape (a library's unsupported case) is never chosen."""
    try:
        return seconds(fn)
    except RuntimeError:
        return float("inf")


def _onednn_int8_product(x: torch.Tensor, w_nk: torch.Tensor):
    """A call of the oneDNN product _onednn_int8_linear emits, on random data; None where
    this build has no oneDNN or it cannot pack the weight."""
    if QLINEAR is None or not torch.backends.mkldnn.is_available():
        return None
    xu = (x.to(torch.int16) + UINT8_ZERO_POINT).to(torch.uint8)
    try:
        packed = torch.ops.onednn.qlinear_prepack(w_nk, list(x.shape))
    except RuntimeError:
        return None
    w_scale, w_zero_points = torch.ones(len(w_nk)), torch.zeros(len(w_nk), dtype=torch.int64)
    return lambda: QLINEAR(xu, 1.0, UINT8_ZERO_POINT, packed, w_scale, w_zero_points, None,
                           1.0, 0, torch.float32, "none", [], "")


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


# oneDNN's fast int8 linear takes unsigned activations: x's int8 codes shifted by 128, with
# that zero point (oneDNN subtracts 128 x the weight's column sums, exactly, in int32).
UINT8_ZERO_POINT = 128
QLINEAR = getattr(getattr(torch.ops.onednn, "qlinear_pointwise", None), "default", None)


def _onednn_int8_linear(gm: fx.GraphModule, node: fx.Node, x: fx.Node, packed: fx.Node,
                        w_scale: fx.Node, bias: fx.Node | None) -> fx.Node:
    """y = qlinear(round(x / sx) + 128 as uint8, packed wq) * sx (+ b), where oneDNN applies
    the weight's per-channel scales sw (x's scale there is 1: its per-row scales sx come
    after) and returns float32 (a float32 x on CPU only)."""
    n = w_scale.meta["val"].shape[0]
    w_zero_points = add_constant(gm, torch.zeros(n, dtype=torch.int64),
                                 node.name + "_int8_zero_points", node)
    graph = gm.graph
    with graph.inserting_before(node):
        quantize, x_scale, codes = _quantize_rows(graph, x)
        shifted = graph.call_function(aten.add.Tensor, (codes, float(UINT8_ZERO_POINT)))
        xu = graph.call_function(aten._to_copy.default, (shifted,), {"dtype": torch.uint8})
        product = graph.call_function(QLINEAR, (
            xu, 1.0, UINT8_ZERO_POINT, packed, w_scale, w_zero_points, None, 1.0, 0,
            torch.float32, "none", [], ""))
        steps = [graph.call_function(aten.mul.Tensor, (product, x_scale))]
        if bias is not None:
            steps.append(graph.call_function(aten.add.Tensor, (steps[0], bias)))
    fake_mode = tensor_meta(x).fake_mode
    set_meta(quantize + [shifted, xu], fake_mode)
    # The packed weight has no fake counterpart to run the op's meta function on.
    product.meta["val"] = node.meta["val"]
    set_meta(steps, fake_mode)
    return steps[-1]


def _quantize_rows(graph: fx.Graph, x: fx.Node) -> tuple[list[fx.Node], fx.Node, fx.Node]:
    """round(x / sx) clamped to +-127 (still float), sx = amax|x row| / 127: (the new nodes
    in order, sx [M, 1], the codes)."""
    steps = [graph.call_function(aten.abs.default, (x,))]
    steps.append(graph.call_function(aten.amax.default, (steps[-1], [-1], True)))  # [M, 1]
    steps.append(graph.call_function(aten.clamp_min.default, (steps[-1], MIN_SCALE)))
    x_scale = graph.call_function(aten.div.Tensor, (steps[-1], INT8_MAX))
    steps += [x_scale, graph.call_function(aten.div.Tensor, (x, x_scale))]
    steps.append(graph.call_function(aten.round.default, (steps[-1],)))
    steps.append(graph.call_function(aten.clamp.default, (steps[-1], -INT8_MAX, INT8_MAX)))
    return steps, x_scale, steps[-1]


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
    quantize, x_scale, codes = _quantize_rows(graph, x)
    steps += quantize
    xq = call(aten._to_copy.default, codes, dtype=torch.int8)
    acc = call(aten._int_mm.default, xq, wq)  # [M, N] int32
    as_float = call(aten._to_copy.default, acc, dtype=torch.float32)
    out = call(aten.mul.Tensor, call(aten.mul.Tensor, as_float, x_scale), w_scale)
    if bias is not None:
        out = call(aten.add.Tensor, out, bias)
    if out_dtype != torch.float32:
        out = call(aten._to_copy.default, out, dtype=out_dtype)
    set_meta(steps, fake.fake_mode)
    return out

