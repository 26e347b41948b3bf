"""Timing, memory and the machine's own limits."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


@dataclasses.dataclass
class Timing:
    median_s: float
    p10_s: float
    p90_s: float
    iterations: int


def time_calls(fn: Callable[[], Any], *, warmup: int, iterations: int,
               max_seconds: float) -> Timing:
    """Median and spread of `fn()` after warm-up; stops early past `max_seconds` of timing."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    budget_end = time.perf_counter() + max_seconds
    while len(times) < iterations and (len(times) < 3 or time.perf_counter() < budget_end):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return summarize(times)


def summarize(times: list[float]) -> Timing:
    times = sorted(times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return Timing(statistics.median(times), pick(0.1), pick(0.9), len(times))


class PeakMemory:
    """Peak resident memory of this process during a block, above what it held before.

    Linux resets the high-water mark (VmHWM) when 5 is written to /proc/self/clear_refs,
    so each backend's peak is its own, in one process."""

    def __enter__(self) -> "PeakMemory":
        self.available = _reset_peak()
        self.before = _status_kb("VmRSS")
        self.peak_mb: float | None = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.available:
            self.peak_mb = (_status_kb("VmHWM") - self.before) / 1024


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def flops_of(fn: Callable[[], Any]) -> int:
    """FLOPs of one call, counted by PyTorch's FlopCounterMode (matmuls, convs, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def machine_peaks(quick: bool) -> dict[str, float]:
    """What this machine can do: matmul throughput per dtype and copy bandwidth."""
    n = 512 if quick else 2048
    peaks = {}
    for name, dtype in (("fp32_gflops", torch.float32), ("bf16_gflops", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t = time_calls(lambda: a @ b, warmup=2, iterations=10, max_seconds=5).median_s
        peaks[name] = 2 * n ** 3 / t / 1e9
    a8 = torch.randint(-128, 127, (n, n), dtype=torch.int8)
    b8 = torch.randint(-128, 127, (n, n), dtype=torch.int8)
    t = time_calls(lambda: torch._int_mm(a8, b8), warmup=2, iterations=10, max_seconds=5).median_s
    peaks["int8_gops"] = 2 * n ** 3 / t / 1e9
    peaks["fp32_onednn_gflops"] = onednn_fp32_gflops(n)
    src = torch.empty(2 ** (22 if quick else 26), dtype=torch.float32).fill_(1)  # 16 or 256 MB
    dst = torch.empty_like(src)
    t = time_calls(lambda: dst.copy_(src), warmup=2, iterations=10, max_seconds=5).median_s
    peaks["copy_gbps"] = 2 * src.numel() * 4 / t / 1e9  # read + write
    return peaks


def onednn_fp32_gflops(n: int) -> float:
    """fp32 matmul through oneDNN with a prepacked weight, as jitopt runs frozen linears: on
    AMD CPUs PyTorch's own `a @ b` goes to MKL, which runs at about 40% of this."""
    if not torch.backends.mkldnn.is_available():
        return 0.0
    a, w = torch.randn(n, n), torch.randn(n, n)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, n)
    t = time_calls(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""),
                   warmup=2, iterations=10, max_seconds=5).median_s
    return 2 * n ** 3 / t / 1e9
