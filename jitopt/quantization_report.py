"""How much a quantized compile changed the answers, measured on the example inputs: each
quantized layer's output SQNR on the activations it really sees, and the end-to-end error of
the compiled graph against the fp32 graph it came from."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from jitopt.passes.graph_facts import writes_input
from jitopt.passes.quantize_linear_int4_weight_only import (
    DEFAULT_GROUP_SIZE, dequantize_int4_grouped, quantize_int4_grouped)
from jitopt.passes.quantize_conv_int8_static import (
    activation_qparams, fake_quantize_activation)
from jitopt.passes.quantize_linear_int8 import (
    INT8_MAX, MIN_SCALE, quantize_per_channel, smoothing_scales)

MATMULS = (torch.ops.aten.addmm.default, torch.ops.aten.mm.default)


@dataclasses.dataclass(frozen=True)
class LayerQuantizer:
    """One quantize= mode applied to one linear layer alone, the way its pass does it."""

    mode: str
    group_size: int | None = None
    # "int8": each layer's measured per-channel max |x|, for SmoothQuant's scales.
    absmax: dict[str, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, layer: str | None = None
                 ) -> torch.Tensor:
        """x @ weight ([K, N]) with the weight, and for "int8" x too, quantized."""
        if self.mode == "int8":
            if self.absmax and layer in self.absmax:
                smooth = smoothing_scales(self.absmax[layer], weight.t())
                x, weight = x / smooth, weight * smooth[:, None]
            wq, w_scale = quantize_per_channel(weight.t())
            x_scale = x.abs().amax(-1, keepdim=True).clamp_min(MIN_SCALE) / INT8_MAX
            xq = torch.round(x / x_scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
            return _int8_product(xq, wq.t()).float() * x_scale * w_scale
        if self.mode == "int8-weight-only":
            wq, w_scale = quantize_per_channel(weight.t())
            return x @ (wq.float() * w_scale[:, None]).t()
        if self.mode == "int4-weight-only":
            group = self.group_size or DEFAULT_GROUP_SIZE
            return x @ dequantize_int4_grouped(*quantize_int4_grouped(weight.t(), group),
                                               group).t()
        if self.mode == "bf16" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            # bf16 compute, as its pass chooses where faster (float32 sums of rounded values)
            return x.to(torch.bfloat16).float() @ weight.to(torch.bfloat16).float()
        if self.mode in ("bf16", "fp16"):
            half = torch.bfloat16 if self.mode == "bf16" else torch.float16
            return x @ weight.to(half).float()
        raise ValueError(f"no layer quantizer for quantize mode {self.mode!r}")

    def convolution(self, args: tuple, input_range: tuple[float, float]) -> torch.Tensor:
        """aten.convolution's args computed as "int8-static" does: the input rounded with the
        calibrated range's scale, the weight per output channel, in float."""
        x, weight, *rest = args
        x = fake_quantize_activation(x, *activation_qparams(*input_range))
        wq, w_scale = quantize_per_channel(weight.reshape(weight.shape[0], -1))
        weight = (wq.float() * w_scale[:, None]).reshape(weight.shape)
        return torch.ops.aten.convolution.default(x, weight, *rest)


def _int8_product(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """xq [M, K] @ wq [K, N], int8 into exact sums: `_int_mm` on CPU; elsewhere in float64
    (exact below 2^53; cuBLASLt's int8 GEMM refuses 16 rows or fewer)."""
    if xq.device.type == "cpu":
        return torch._int_mm(xq, wq)
    return xq.double() @ wq.double()


def measure(reference: fx.GraphModule, compiled: Callable[[list], Any],
            inputs: Sequence[Any], layers: list[dict[str, Any]], quantizer: LayerQuantizer
            ) -> dict[str, Any] | None:
    """Fill each entry of `layers` with "output_sqnr_db" (that layer alone quantized, on the
    activations it sees) and return the end-to-end error
    ({"cosine", "max_abs_error", "outputs"}); None when the inputs cannot be used (symbolic,
    fake) or running the graph would write into them."""
    recorded = _recorded(reference, inputs, {q["layer"] for q in layers})
    if recorded is None:
        return None
    recorder, want = recorded
    with torch.no_grad():
        got = compiled(list(inputs))
    for q in layers:
        # "reason": kept in fp32; an embedding's output error is its table's (weight SQNR)
        if "reason" not in q and q.get("kind") != "embedding" and q["layer"] in recorder.seen:
            q["output_sqnr_db"] = round(_layer_sqnr(*recorder.seen[q["layer"]], quantizer,
                                                    q.get("input_range"), q["layer"]), 2)
    return _end_to_end(want, got)


def linear_sqnrs(reference: fx.GraphModule, inputs: Sequence[Any], quantizer: LayerQuantizer
                 ) -> dict[str, float] | None:
    """Each addmm/mm's (and calibrated convolution's) output SQNR (dB) were it quantized
    alone, on the example inputs: what an accuracy budget decides from, before any layer is
    rewritten. None: not measurable."""
    ranges = {n.name: n.meta.get("input_range") for n in reference.graph.nodes
              if n.target in MATMULS or "input_range" in n.meta}
    recorded = _recorded(reference, inputs, set(ranges))
    if recorded is None:
        return None
    return {name: _layer_sqnr(*seen, quantizer, ranges[name], name)
            for name, seen in recorded[0].seen.items()
            if all(a.dtype == torch.float32 for a in seen[0] if isinstance(a, torch.Tensor))}


def activation_absmax(reference: fx.GraphModule, inputs: Sequence[Any]
                      ) -> dict[str, torch.Tensor] | None:
    """Each 2-D float32 addmm/mm's per-input-channel max |x| on the example inputs (for
    quantize="int8"'s SmoothQuant scales). None: not measurable."""
    recorded = _recorded(reference, inputs,
                         {n.name for n in reference.graph.nodes if n.target in MATMULS})
    if recorded is None:
        return None
    found = {}
    for name, (args, _) in recorded[0].seen.items():
        x = args[-2]
        if isinstance(x, torch.Tensor) and x.dim() == 2 and x.dtype == torch.float32:
            found[name] = x.abs().amax(dim=0)
    return found


def _recorded(reference: fx.GraphModule, inputs: Sequence[Any], names: set[str]
              ) -> tuple["_Recorder", Any] | None:
    """Run the fp32 graph on the example inputs, keeping the named layers' operands and
    outputs: (the recorder, the graph's outputs), or None when the inputs cannot be used
    (symbolic, fake) or running the graph would write into them."""
    if not all(_real(x) for x in inputs) or any(writes_input(n) for n in reference.graph.nodes):
        return None
    reference.recompile()
    recorder = _Recorder(reference, names)
    with torch.no_grad():
        return recorder, recorder.run(*inputs)


class _Recorder(fx.Interpreter):
    """Runs the fp32 graph, keeping each named linear's operands and output."""

    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names = names
        self.seen: dict[str, tuple[tuple, torch.Tensor]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.names:
            self.seen[n.name] = (self.map_nodes_to_values(n.args, n), out)
        return out


def _layer_sqnr(args: tuple, out: torch.Tensor, quantizer: LayerQuantizer,
                input_range: tuple[float, float] | None = None, layer: str | None = None
                ) -> float:
    """SQNR in dB of the quantized product against the fp32 one."""
    return _sqnr_db(out, _quantized_output(args, quantizer, input_range, layer))


def _quantized_output(args: tuple, quantizer: LayerQuantizer,
                      input_range: tuple[float, float] | None, layer: str | None
                      ) -> torch.Tensor:
    """The layer's output with its quantization applied, for addmm(b, x, w), mm(x, w), or a
    convolution with its calibrated input range."""
    if input_range is not None:
        return quantizer.convolution(args, input_range)
    bias, x, weight = args if len(args) == 3 else (None, *args)
    quantized = quantizer(x, weight, layer)
    return quantized if bias is None else quantized + bias


def keep_for_error_budget(reference: fx.GraphModule, inputs: Sequence[Any],
                          quantizer: LayerQuantizer, max_error: float,
                          sqnrs: dict[str, float]) -> dict[str, str]:
    """Layer name -> why it stays fp32: the fewest of the most sensitive layers (lowest
    SQNR first) whose keeping brings the estimated end-to-end relative error within
    `max_error`. The estimate runs the fp32 graph with every other layer quantized alone,
    so each layer's error reaches the outputs as it would compiled. Doubling, then
    bisection: a handful of runs of the graph, not one per layer."""
    order = sorted(sqnrs, key=sqnrs.get)
    ranges = {n.name: n.meta.get("input_range") for n in reference.graph.nodes}
    with torch.no_grad():
        want = _tensors(reference(*inputs))

    errors: dict[int, float] = {}

    def error(kept: int) -> float:  # each count simulated once
        if kept not in errors:
            quantized = {name: ranges.get(name) for name in order[kept:]}
            got = _tensors(_Simulator(reference, quantized, quantizer).run(*inputs))
            errors[kept] = _relative_error(want, got)
        return errors[kept]

    if not order or error(0) <= max_error:
        return {}
    bad, good = 0, 1
    while good < len(order) and error(good) > max_error:
        bad, good = good, min(2 * good, len(order))
    while good - bad > 1:
        middle = (bad + good) // 2
        bad, good = (bad, middle) if error(middle) <= max_error else (middle, good)
    estimate = error(good)
    return {name: (f"kept in fp32 for the end-to-end budget (relative error <= {max_error:g}): "
                   f"among the {good} most sensitive layers (output SQNR {sqnrs[name]:.1f} "
                   f"dB); estimated error with them kept {estimate:.3g}")
            for name in order[:good]}


class _Simulator(fx.Interpreter):
    """Runs the fp32 graph with the named layers' outputs replaced by their quantized form."""

    def __init__(self, gm: fx.GraphModule, quantized: dict[str, Any],
                 quantizer: LayerQuantizer) -> None:
        super().__init__(gm)
        self.quantized, self.quantizer = quantized, quantizer

    def run_node(self, n: fx.Node) -> Any:
        if n.name not in self.quantized:
            return super().run_node(n)
        args = self.map_nodes_to_values(n.args, n)
        return _quantized_output(args, self.quantizer, self.quantized[n.name], n.name)


def _relative_error(want: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    pairs = [(w.double(), g.double()) for w, g in zip(want, got) if w.is_floating_point()]
    noise = sum((w - g).pow(2).sum().item() for w, g in pairs)
    power = sum(w.pow(2).sum().item() for w, _ in pairs)
    return math.sqrt(noise / max(power, 1e-300))


def _sqnr_db(signal: torch.Tensor, approx: torch.Tensor) -> float:
    noise = (signal.double() - approx.double()).pow(2).sum().item()
    power = signal.double().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(max(power, 1e-300) / noise)


def _end_to_end(want: Any, got: Any) -> dict[str, Any]:
    pairs = [(w, g) for w, g in zip(_tensors(want), _tensors(got)) if w.is_floating_point()]
    if not pairs:
        return {"outputs": 0}
    flat_w = torch.cat([w.detach().double().flatten() for w, _ in pairs])
    flat_g = torch.cat([g.detach().double().flatten() for _, g in pairs])
    cosine = torch.nn.functional.cosine_similarity(flat_w, flat_g, 0).item()
    return {"outputs": len(pairs), "cosine": round(cosine, 6),
            "max_abs_error": float((flat_w - flat_g).abs().max()),
            "relative_error": _relative_error([flat_w], [flat_g])}


def _tensors(value: Any) -> list[torch.Tensor]:
    values = value if isinstance(value, (list, tuple)) else [value]
    return [v for v in values if isinstance(v, torch.Tensor)]


def _real(x: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(x, (torch.SymInt, torch.SymFloat, FakeTensor)):
        return False
    return not isinstance(x, torch.Tensor) or type(x) in (torch.Tensor, torch.nn.Parameter)
