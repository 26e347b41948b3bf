"""Each model's floor: its matmuls, convolutions and attention timed alone, against jitopt.

    python -m benchmarks.floor                        # mlp, cnn, gpt2, bert (about 4 min)
    python -m benchmarks.floor --model cnn --quick    # a look in seconds

The floor is what a model would cost if nothing but its matmuls, convolutions and attention
ran, each at this machine's library peak. To find it, one eager forward runs under a dispatch
mode that records every such call (shapes, strides, arguments, which operand is a weight).
Each distinct call is then timed alone with the fastest library kernel this machine has for
it: oneDNN with the weight prepacked for that call's rows (channels-last for a convolution),
or the ATen op as eager called it, whichever is faster. Two figures per call:

- hot: called back to back, its weight in cache: the library's peak for that shape;
- cold: after a write over a buffer twice the last-level cache, as in a whole model, where
  each layer's weight comes from memory.

Attention counts as its two matmuls' FLOPs at the packed fp32 GEMM peak measured in the same
process (no CPU attention kernel here runs faster). The floor sums all of these over the
calls (times their counts). Beside it: eager's and jitopt's medians (each timed alone,
first, one process per model; then jitopt and the floor's calls hot are timed again in 4
alternating rounds, and each figure is its median over the rounds, since this machine's
speed drifts by 5-10% over minutes) and jitopt's profile, split into its matmul, convolution and
attention calls (oneDNN and ATen ops, and jitopt's own kernels for them, which the runtime
names in a profiler trace) and everything else.
gpt2-generate is left out: a decode step is bound by reading the weights, not by its FLOPs.

Output: a markdown report on stdout, floor.json and floor.md in --out.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.measure import onednn_fp32_gflops, summarize, time_calls
from benchmarks.models import MODELS

aten = torch.ops.aten
MODEL_NAMES = ("mlp", "cnn", "gpt2", "bert")
MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
CONVOLUTIONS = {aten.convolution.default}
ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu.default}
RECORDED = MATMULS | CONVOLUTIONS | ATTENTION
# Self time in these profiler events is jitopt's matmul, convolution and attention time:
# library ops, and jitopt's kernels for them ("jitopt <partition>: <kernel>").
LIBRARY_EVENTS = ("mkldnn::_linear_pointwise", "mkldnn::_convolution_pointwise",
                  "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                  "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::mkldnn_convolution")
JITOPT_KERNEL_EVENT = re.compile(
    r"jitopt \w+: (float_linear|quantized_linear|attention|winograd)_\d+")
FLUSH_BYTES = 128 * 2 ** 20  # twice this machine's 32 MB L3, and then some
ROUNDS = 4  # alternating rounds of jitopt and the floor's calls (hot), after the first of each


class _Call:
    """One distinct library call of the eager model and how often it ran."""

    def __init__(self, op: torch._ops.OpOverload, args: tuple, kwargs: dict,
                 weight_index: int | None) -> None:
        self.op, self.args, self.kwargs, self.weight_index = op, args, kwargs, weight_index
        self.count = 0

    def __call__(self) -> Any:
        return self.op(*self.args, **self.kwargs)

    def activations(self) -> list[torch.Tensor]:
        return [a for i, a in enumerate(self.args)
                if isinstance(a, torch.Tensor) and i != self.weight_index]

    def describe(self) -> str:
        shapes = "x".join(str(list(a.shape)) for a in self.args if isinstance(a, torch.Tensor))
        return f"{self.op.__name__.split('.')[0]} {shapes}"


class _Recorder(TorchDispatchMode):
    """Counts each distinct matmul/convolution/attention call, keeping its first arguments."""

    def __init__(self, weight_storages: set[int]) -> None:
        super().__init__()
        self.weight_storages = weight_storages
        self.calls: dict[tuple, _Call] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in RECORDED:
            key = (func, *(_signature(a) for a in args), *sorted(kwargs.items()))
            if key not in self.calls:
                self.calls[key] = _Call(func, args, kwargs, self._weight_index(func, args))
            self.calls[key].count += 1
        return func(*args, **kwargs)

    def _weight_index(self, func, args: tuple) -> int | None:
        """Where the frozen weight is: addmm(bias, x, w), mm(x, w), convolution(x, w, ...)."""
        index = {aten.addmm.default: 2, aten.mm.default: 1,
                 aten.convolution.default: 1}.get(func)
        if index is None or args[index].untyped_storage().data_ptr() not in self.weight_storages:
            return None
        return index


def _signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.stride(), value.dtype)
    return tuple(value) if isinstance(value, list) else value


def record_calls(model: torch.nn.Module, inputs: tuple) -> list[_Call]:
    """The model's distinct library calls in one eager forward."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    recorder = _Recorder(weights)
    with torch.no_grad(), recorder:
        model(*inputs)
    return list(recorder.calls.values())


def candidates(call: _Call) -> dict[str, Callable[[], Any]]:
    """Ways this machine's libraries can run `call`: the ATen op as eager called it, and oneDNN
    over a weight prepacked for this call (channels-last for a convolution). Attention is
    counted apart, at the GEMM peak (see measure_call)."""
    ways = {"aten": call}
    if not torch.backends.mkldnn.is_available() or call.weight_index is None:
        return ways
    if call.op in CONVOLUTIONS:
        ways.update(_onednn_convolution(call.args))
    elif call.args[call.weight_index].dtype == torch.float32:
        ways["onednn packed"] = _onednn_linear(call)
    return ways


def _onednn_linear(call: _Call) -> Callable[[], Any]:
    if call.op is aten.addmm.default:
        bias, x, weight = call.args
    else:
        (x, weight), bias = call.args, None
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.t(), x.shape[0])  # [N, K]
    return lambda: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _onednn_convolution(args: tuple) -> dict[str, Callable[[], Any]]:
    x, weight, bias, stride, padding, dilation, transposed, _, groups = args
    if transposed or weight.dim() != 4:
        return {}
    x_cl = x.contiguous(memory_format=torch.channels_last)
    w_cl = weight.contiguous(memory_format=torch.channels_last)
    packed = torch.ops.mkldnn._reorder_convolution_weight(
        weight, list(padding), list(stride), list(dilation), groups, list(x.shape))
    conv = torch.ops.mkldnn._convolution_pointwise.default
    return {"aten channels-last": lambda: aten.convolution(x_cl, w_cl, *args[2:]),
            "onednn packed": lambda: conv(x_cl, packed, bias, list(padding), list(stride),
                                          list(dilation), groups, "none", [], "")}


def flops(call: _Call) -> int:
    if call.op in ATTENTION:  # FlopCounterMode has no rule for the CPU flash kernel
        q, k = call.args[0], call.args[1]
        return 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
    counter = FlopCounterMode(display=False)
    with counter:
        call()
    return counter.get_total_flops()


def time_cold(fn: Callable[[], Any], activations: list[torch.Tensor],
              iterations: int) -> float:
    """Median seconds of `fn()` with its weight out of cache and its activations in: as in a
    whole model, where a layer's input was just written and its weight was not read since
    the last call. Each call follows a write over a buffer larger than the caches."""
    flush = torch.empty(FLUSH_BYTES // 4)
    times = []
    for _ in range(iterations):
        flush.add_(1.0)
        for activation in activations:
            activation.sum()
        times.append(_seconds(fn))
    return summarize(times).median_s


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_call(call: _Call, quick: bool, peak_flops: float
                 ) -> tuple[dict[str, Any], Callable[[], Any] | None]:
    """The fastest library way to run `call`, hot and cold, with its FLOPs and count.
    Attention is its two matmuls' FLOPs at `peak_flops`, the packed fp32 GEMM's: ATen's CPU
    kernel runs at a third of that here, and jitopt runs its own (codegen/cpp_attention.py),
    so a measured library time would be no floor. Also returns the chosen way to run it
    (None for attention)."""
    row = {"call": call.describe(), "count": call.count, "flops": flops(call)}
    if call.op in ATTENTION:
        at_peak = row["flops"] / peak_flops
        return {**row, "kernel": "at GEMM peak", "hot_s": at_peak, "cold_s": at_peak}, None
    ways = candidates(call)  # (packs weights: once)
    hot = {name: time_calls(fn, warmup=2, iterations=5 if quick else 20,
                            max_seconds=1 if quick else 3).median_s
           for name, fn in ways.items()}
    best = min(hot, key=hot.get)
    cold = time_cold(ways[best], call.activations(), 3 if quick else 10)
    return {**row, "kernel": best, "hot_s": hot[best], "cold_s": cold}, ways[best]


def jitopt_profile(fn: Callable[[], Any], calls: int) -> float:
    """The fraction of jitopt's time in matmul, convolution and attention calls (self time),
    from torch.profiler: a fraction of the profiled run's time, since profiling itself
    slows every call a little."""
    with torch.profiler.profile() as profile:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        total_s = time.perf_counter() - start
    heavy_us = sum(event.self_cpu_time_total for event in profile.key_averages()
                   if event.key in LIBRARY_EVENTS or JITOPT_KERNEL_EVENT.fullmatch(event.key))
    return min(1.0, heavy_us / 1e6 / total_s)


def run_model(name: str, quick: bool) -> dict[str, Any]:
    import jitopt

    bench = MODELS[name](quick)
    model, inputs = bench.module, bench.inputs
    with torch.no_grad():
        # The models first, each alone, before the floor's calls and buffers fill the process
        # (a harness that timed jitopt only after them, interleaved with eager, saw it 5-20%
        # slower than the main suite; in the alternating rounds below it measured 1-2% slower
        # than alone).
        compiled = torch.compile(model, backend="jitopt")
        for _ in range(3):
            compiled(*inputs)
        jitopt.finish_compiles()
        jit = lambda: compiled(*inputs)  # noqa: E731
        medians = {key: time_calls(fn, warmup=2, iterations=5 if quick else 20,
                                   max_seconds=2 if quick else 20).median_s
                   for key, fn in (("jitopt", jit), ("eager", lambda: model(*inputs)))}
        matmul_share = jitopt_profile(jit, 2 if quick else 5)
        calls = record_calls(model, inputs)
        peak_flops = onednn_fp32_gflops(512 if quick else 2048) * 1e9
        if not calls:
            raise RuntimeError(f"{name}: eager ran no matmul, convolution or attention call")
        rows, ways = zip(*[measure_call(call, quick, peak_flops) for call in calls])
        jitopt_s = _alternate(jit, medians["jitopt"], rows, ways, 1 if quick else ROUNDS)
    return {"model": name, "calls": list(rows), "peak_gflops": peak_flops / 1e9,
            "eager_s": medians["eager"], "rounds": 1 if quick else ROUNDS,
            "jitopt_s": jitopt_s, "jitopt_matmul_s": jitopt_s * matmul_share,
            "hot_floor_s": sum(r["hot_s"] * r["count"] for r in rows),
            "cold_floor_s": sum(r["cold_s"] * r["count"] for r in rows),
            "flops": sum(r["flops"] * r["count"] for r in rows)}


def _alternate(jit: Callable[[], Any], jit_first_s: float, rows: Sequence[dict[str, Any]],
               ways: Sequence[Callable[[], Any] | None], rounds: int) -> float:
    """jitopt's median, after timing it and the floor's calls (hot) again in `rounds`
    alternating rounds; each call's hot time becomes its median over the rounds too. Why:
    this machine's speed drifts by 5-10% over minutes, so one phase each could compare a
    slow minute with a fast one."""
    jit_s, hot_s = [jit_first_s], [[row["hot_s"]] for row in rows]
    for _ in range(rounds):
        jit_s.append(time_calls(jit, warmup=1, iterations=10, max_seconds=10).median_s)
        for fn, times in zip(ways, hot_s):
            if fn is not None:  # (attention: FLOPs at the peak, not timed)
                times.append(time_calls(fn, warmup=1, iterations=10, max_seconds=2).median_s)
    for row, times in zip(rows, hot_s):
        row["hot_s"] = statistics.median(times)
    return statistics.median(jit_s)


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| model | eager | jitopt | floor, hot | floor, cold | jitopt / hot floor "
             "| jitopt / cold floor | jitopt in matmul, convolution, attention (profiled share) "
             "| jitopt elsewhere |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} |")
            continue
        ms = lambda s: f"{s * 1e3:.2f} ms"  # noqa: E731
        lines.append(f"| {r['model']} | {ms(r['eager_s'])} | {ms(r['jitopt_s'])} "
                     f"| {ms(r['hot_floor_s'])} | {ms(r['cold_floor_s'])} "
                     f"| {r['jitopt_s'] / r['hot_floor_s']:.2f}x "
                     f"| {r['jitopt_s'] / r['cold_floor_s']:.2f}x "
                     f"| {ms(r['jitopt_matmul_s'])} "
                     f"| {ms(max(0.0, r['jitopt_s'] - r['jitopt_matmul_s']))} |")
    for r in results:
        if "error" not in r:
            lines += ["", *_call_table(r)]
    return "\n".join(lines) + "\n"


def _call_table(result: dict[str, Any]) -> list[str]:
    lines = [f"### {result['model']}: {result['flops'] / 1e9:.1f} GFLOP per call; packed fp32 "
             f"GEMM peak in this process {result['peak_gflops']:.0f} GFLOP/s", "",
             "| call | count | GFLOP each | kernel | hot ms (GFLOP/s) | cold ms (GFLOP/s) "
             "| share of hot floor |", "|---|---|---|---|---|---|---|"]
    rows = sorted(result["calls"], key=lambda r: -r["hot_s"] * r["count"])
    for r in rows:
        gflop = r["flops"] / 1e9
        lines.append(f"| `{r['call']}` | {r['count']} | {gflop:.3f} | {r['kernel']} "
                     f"| {r['hot_s'] * 1e3:.3f} ({gflop / r['hot_s']:.0f}) "
                     f"| {r['cold_s'] * 1e3:.3f} ({gflop / r['cold_s']:.0f}) "
                     f"| {r['hot_s'] * r['count'] / result['hot_floor_s']:.0%} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", choices=MODEL_NAMES,
                        help="a model to measure (repeatable; default: all)")
    parser.add_argument("--quick", action="store_true", help="small models, few iterations")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--worker", choices=MODEL_NAMES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # one model, in this process
        print(json.dumps(run_model(args.worker, args.quick)))
        return 0
    results = []
    for name in args.model or MODEL_NAMES:
        print(f"floor: {name} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, "-m", "benchmarks.floor", "--worker", name,
                               *(["--quick"] if args.quick else [])],
                              capture_output=True, text=True)
        try:
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        except (IndexError, json.JSONDecodeError):
            results.append({"model": name, "error": (done.stderr.strip().splitlines()
                                                     or ["no output"])[-1]})
    report = markdown(results)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "floor.json").write_text(json.dumps(results, indent=1))
    command = " ".join(["python -m benchmarks.floor", *(argv or sys.argv[1:])])
    (args.out / "floor.md").write_text(f"Command: `{command}`\n\n{report}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
