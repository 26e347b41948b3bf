"""An eager reference for jitopt's quantize= modes, by module swap: the oracle the compiled
quantized graphs are checked against (they must match it closely, and both must be close to
fp32)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn

INT8_MAX = 127.0
MIN_SCALE = 1e-12


class Int8DynamicLinear(nn.Module):
    """nn.Linear as quantize="int8" computes it: per-output-channel symmetric int8 weights,
    per-row (token) symmetric int8 activations scaled at run time, an exact integer product
    (float64 holds these sums exactly), then both scales and the bias. Given the input's
    per-channel max |x| (`x_absmax`), SmoothQuant first: x / s and W * s with
    s = sqrt(max|x_k| / max|W_k|) per input channel k, at least 1."""

    def __init__(self, linear: nn.Linear, x_absmax: torch.Tensor | None = None) -> None:
        super().__init__()
        w = linear.weight.detach()
        self.smooth = None
        if x_absmax is not None:
            self.smooth = (x_absmax.clamp_min(1e-5).sqrt()
                           / w.abs().amax(dim=0).clamp_min(1e-5).sqrt()).clamp(1.0, 1e4)
            w = w * self.smooth
        self.w_scale = (w.abs().amax(dim=1) / INT8_MAX).clamp_min(MIN_SCALE)
        self.wq = torch.round(w / self.w_scale[:, None]).clamp(-INT8_MAX, INT8_MAX)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = x * (1.0 / self.smooth)
        x_scale = (x.abs().amax(dim=-1, keepdim=True).clamp_min(MIN_SCALE) / INT8_MAX)
        xq = torch.round(x / x_scale).clamp(-INT8_MAX, INT8_MAX)
        product = (xq.double() @ self.wq.double().t()).float()
        out = product * x_scale * self.w_scale
        return out if self.bias is None else out + self.bias


def quantize_int8_reference(model: nn.Module, *example_inputs: torch.Tensor) -> nn.Module:
    """A copy of `model` with every nn.Linear swapped for Int8DynamicLinear, smoothed by the
    inputs' channel maxima on `example_inputs` where given (as a compile on them does)."""
    absmax = linear_input_absmax(model, *example_inputs) if example_inputs else {}
    return _swap_linears(model, lambda name, linear: Int8DynamicLinear(linear, absmax.get(name)))


def linear_input_absmax(model: nn.Module, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each nn.Linear's per-input-channel max |x| over one eager run on `inputs`, by name."""
    found: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args):
            found[name] = args[0].detach().abs().flatten(0, -2).amax(dim=0)
        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules()
               if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return found


class Int8WeightOnlyLinear(nn.Module):
    """nn.Linear as quantize="int8-weight-only" computes it: the same per-output-channel int8
    weights, float activations, the product in float64 (the compiled kernel sums in float32)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        scale = (w.abs().amax(dim=1) / INT8_MAX).clamp_min(MIN_SCALE)
        self.weight = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX) * scale[:, None]
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = (x.double() @ self.weight.double().t()).float()
        return out if self.bias is None else out + self.bias


def quantize_int8_weight_only_reference(model: nn.Module) -> nn.Module:
    """A copy of `model` with every nn.Linear swapped for Int8WeightOnlyLinear."""
    return _swap_linears(model, lambda name, linear: Int8WeightOnlyLinear(linear))


def _swap_linears(model: nn.Module, swap: Callable[[str, nn.Linear], nn.Module]) -> nn.Module:
    model = copy.deepcopy(model)
    for name, child in list(model.named_modules()):
        if isinstance(child, nn.Linear):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, swap(name, child))
    return model


class Int4WeightOnlyLinear(nn.Module):
    """nn.Linear as quantize="int4-weight-only" computes it: each output channel's weights in
    groups of `group_size` input channels, mapped to 16 levels from the group's min to its
    max; float activations, the product in float64."""

    def __init__(self, linear: nn.Linear, group_size: int = 64) -> None:
        super().__init__()
        w = linear.weight.detach().double()
        groups = [w[:, k:k + group_size] for k in range(0, w.shape[1], group_size)]
        self.weight = torch.cat([_int4_levels(g) for g in groups], dim=1)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = (x.double() @ self.weight.t()).float()
        return out if self.bias is None else out + self.bias


def _int4_levels(group: torch.Tensor) -> torch.Tensor:
    low, high = group.amin(1, keepdim=True), group.amax(1, keepdim=True)
    scale = ((high - low) / 15).clamp_min(MIN_SCALE).float().double()
    low = low.float().double()  # the compiled graph keeps scale and offset in float32
    return torch.round((group - low) / scale).clamp(0, 15) * scale + low


def quantize_int4_weight_only_reference(model: nn.Module, group_size: int = 64) -> nn.Module:
    """A copy of `model` with every nn.Linear swapped for Int4WeightOnlyLinear."""
    return _swap_linears(model, lambda name, linear: Int4WeightOnlyLinear(linear, group_size))


class Int8StaticConv2d(nn.Module):
    """nn.Conv2d as quantize="int8-static" computes it: the input rounded to uint8 with the
    scale and zero point fixed by its calibrated range [lo, hi] (widened to hold 0; values
    outside are clipped), per-output-channel symmetric int8 weights, the convolution of the
    rounded values in float64 (oneDNN's int32 sums are exact)."""

    def __init__(self, conv: nn.Conv2d, input_range: tuple[float, float]) -> None:
        super().__init__()
        lo, hi = min(input_range[0], 0.0), max(input_range[1], 0.0)
        self.scale = max((hi - lo) / 255, 1e-8)
        self.zero_point = min(max(round(-lo / self.scale), 0), 255)
        w = conv.weight.detach()
        w_scale = (w.flatten(1).abs().amax(dim=1) / INT8_MAX).clamp_min(MIN_SCALE)
        w_scale = w_scale[:, None, None, None]
        self.weight = torch.round(w / w_scale).clamp(-INT8_MAX, INT8_MAX) * w_scale
        self.bias = None if conv.bias is None else conv.bias.detach()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(x / self.scale) + self.zero_point, 0, 255)
        x = (q - self.zero_point) * self.scale
        c = self.conv
        bias = None if self.bias is None else self.bias.double()
        out = torch.nn.functional.conv2d(x.double(), self.weight.double(), bias, c.stride,
                                         c.padding, c.dilation, c.groups)
        return out.float()


def quantize_int8_static_reference(model: nn.Module,
                                   ranges: dict[str, tuple[float, float]]) -> nn.Module:
    """A copy of `model` with each nn.Conv2d named in `ranges` (a jitopt.Calibration's)
    swapped for Int8StaticConv2d."""
    model = copy.deepcopy(model)
    for name, rng in ranges.items():
        parent, _, attr = name.rpartition(".")
        conv = model.get_submodule(name)
        setattr(model.get_submodule(parent), attr, Int8StaticConv2d(conv, rng))
    return model
