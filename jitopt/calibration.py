"""Static activation ranges for `quantize="int8-static"`, from running the model on sample
batches: `jitopt.calibrate(model, batches)` records the range of every convolution's input,
and a later compile of that model quantizes those activations with fixed scales.

The ranges are kept beside the convolutions' weight tensors (weakly, so they go with the
model), which is how a compiled graph finds them: its frozen weights are those tensors."""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx

OBSERVERS = ("minmax", "percentile", "entropy")
BINS = 2048
# Input range per weight tensor's storage: (weakref to the weight, range).
_RANGES: dict[tuple[int, int, tuple[int, ...]], tuple[weakref.ref, tuple[float, float]]] = {}


@dataclasses.dataclass
class Calibration:
    """What `calibrate` recorded: each convolution's input range, by module name."""

    observer: str
    batches: int
    ranges: dict[str, tuple[float, float]]

    def __str__(self) -> str:
        lines = [f"jitopt calibration ({self.observer}, {self.batches} batches):"]
        lines += [f"  {name}: [{lo:.4g}, {hi:.4g}]" for name, (lo, hi) in self.ranges.items()]
        return "\n".join(lines)


def calibrate(model: torch.nn.Module, batches: Iterable[Any], *, observer: str = "minmax",
              percentile: float = 99.99) -> Calibration:
    """Run `model` (eager, no gradients) on each batch (a tensor, or a tuple of positional
    inputs) and record each nn.Conv2d's input range for `quantize="int8-static"`.

    observer: "minmax" (the extremes seen), "percentile" (clip the `percentile` % tails:
    robust to rare outliers) or "entropy" (the clip that loses least information, by
    KL divergence between the activations and their quantized form, as TensorRT does).
    Calibrate with inputs like the ones served; a later compile of `model` uses the ranges."""
    if observer not in OBSERVERS:
        raise ValueError(f"jitopt.calibrate: observer must be one of {list(OBSERVERS)}, "
                         f"got {observer!r}")
    if not 0 < percentile <= 100:
        raise ValueError(f"jitopt.calibrate: percentile must be in (0, 100], got {percentile}")
    batches = [b if isinstance(b, (tuple, list)) else (b,) for b in batches]
    if not batches:
        raise ValueError("jitopt.calibrate: no batches given; pass a few typical inputs")
    convs = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    if not convs:
        raise ValueError("jitopt.calibrate: the model has no nn.Conv2d to calibrate "
                         "(int8-static quantizes convolutions)")
    extremes = _observe(model, convs, batches, lambda name, x, seen: _widen(seen, x))
    if observer != "minmax":
        hists = _observe(model, convs, batches, lambda name, x, h: _histogram(
            x, extremes[name]) + (0 if h is None else h))
        pick = _percentile_range if observer == "percentile" else _entropy_range
        # An input that never varied has nothing to clip (and no histogram width).
        ranges = {n: pick(hists[n], rng, percentile) if rng[1] > rng[0] else rng
                  for n, rng in extremes.items()}
    else:
        ranges = dict(extremes)
    for name, rng in ranges.items():
        _remember(convs[name].weight, rng)
    return Calibration(observer, len(batches), ranges)


def input_range(weight: torch.Tensor) -> tuple[float, float] | None:
    """The calibrated input range of the convolution owning `weight`, if any."""
    entry = _RANGES.get(_key(weight))
    return entry[1] if entry is not None and entry[0]() is not None else None


def attach_input_ranges(gm: fx.GraphModule) -> int:
    """Set node.meta["input_range"] on each convolution whose frozen weight was calibrated
    (before any pass replaces the weight); returns how many."""
    found = 0
    for node in gm.graph.nodes:
        if node.target is not torch.ops.aten.convolution.default:
            continue
        weight = node.args[1]
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            rng = input_range(getattr(gm, weight.target))
            if rng is not None:
                node.meta["input_range"] = rng
                found += 1
    return found


def _key(t: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


def _remember(weight: torch.Tensor, rng: tuple[float, float]) -> None:
    key = _key(weight)
    _RANGES[key] = (weakref.ref(weight), rng)
    weakref.finalize(weight, _RANGES.pop, key, None)


def _observe(model, convs, batches, update) -> dict[str, Any]:
    """Run every batch with a pre-hook on each conv: state[name] = update(name, input,
    state[name] or None)."""
    state: dict[str, Any] = {}

    def hook(name):
        def observe(module, args):
            state[name] = update(name, args[0].detach().float(), state.get(name))
        return observe

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in convs.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                model(*batch)
    finally:
        for h in handles:
            h.remove()
    return state


def _widen(seen: tuple[float, float] | None, x: torch.Tensor) -> tuple[float, float]:
    lo, hi = x.min().item(), x.max().item()
    return (lo, hi) if seen is None else (min(seen[0], lo), max(seen[1], hi))


def _histogram(x: torch.Tensor, extremes: tuple[float, float]) -> torch.Tensor:
    """BINS bins over the [min, max] the first pass saw."""
    lo, hi = extremes
    return torch.histc(x, BINS, lo, hi if hi > lo else lo + 1e-6).double()


def _percentile_range(hist: torch.Tensor, extremes: tuple[float, float],
                      percentile: float) -> tuple[float, float]:
    lo, hi = extremes
    cdf = hist.cumsum(0) / hist.sum()
    tail = (100.0 - percentile) / 100.0
    width = (hi - lo) / BINS
    first = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=cdf.dtype)))
    last = int(torch.searchsorted(cdf, torch.tensor(1 - tail, dtype=cdf.dtype)))
    return (lo + first * width if lo < 0 else lo, lo + (min(last, BINS - 1) + 1) * width)


def _entropy_range(hist: torch.Tensor, extremes: tuple[float, float],
                   _percentile: float) -> tuple[float, float]:
    """The clip of the upper tail (and, for signed inputs, the matching lower one) whose
    quantization to 256 levels has the least KL divergence from the histogram."""
    lo, hi = extremes
    width = (hi - lo) / BINS
    zero = min(max(int(round(-lo / width)), 0), BINS - 1) if lo < 0 else 0
    upper = hist[zero:]  # the magnitudes above zero: what clipping trades against rounding
    levels = 255 if lo >= 0 else 128
    best, best_kl = len(upper), math.inf
    for stop in range(levels, len(upper) + 1, max(1, len(upper) // 256)):
        kl = _clip_divergence(upper, stop, levels)
        if kl < best_kl:
            best, best_kl = stop, kl
    top = lo + (zero + best) * width
    return (max(lo, -(top - (lo + zero * width))) if lo < 0 else lo, top)


def _clip_divergence(hist: torch.Tensor, stop: int, levels: int) -> float:
    p = hist[:stop].clone()
    p[-1] += hist[stop:].sum()  # the clipped tail lands on the last level
    chunks = torch.tensor_split(hist[:stop], levels)
    q = torch.cat([torch.where(c > 0, c.sum() / (c > 0).sum().clamp_min(1), 0.0)
                   for c in chunks])
    p, q = p / p.sum(), q / q.sum().clamp_min(1e-30)
    mask = p > 0
    return float((p[mask] * torch.log(p[mask] / q[mask].clamp_min(1e-12))).sum())
