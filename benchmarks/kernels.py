"""Kernel microbenchmark: eager, Inductor and jitopt on three memory-bound kernels, one process.

    python -m benchmarks.kernels                                 # all kernels and backends
    python -m benchmarks.kernels --only chain6 --backends eager,jitopt --rounds 5

Why: these are the acceptance numbers for jitopt's fused kernels. jitopt meets them when

    chain6             >= 3x eager, >= Inductor, and >= 70% of the machine's copy bandwidth
    softmax, layernorm >= eager and >= 0.9x Inductor

(the table's last column says which are met).

What it measures:

- chain6: `torch.sigmoid((x * 1.5 + y).relu() - 0.25) * y` on two contiguous [4096, 4096]
  float32 tensors (16M elements), exactly six ATen pointwise ops after lowering. Eager runs
  six kernels and materialises five intermediates; a fused kernel reads x and y once and writes
  the result once.
- softmax: `torch.softmax(x, dim=-1)` on [4096, 1024] float32.
- layernorm: `F.layer_norm(x, (1024,), w, b)` on [4096, 1024] float32, random w and b.

Per kernel and backend:

- the output, checked against eager with `torch.testing.assert_close` before any timing; a
  mismatch or a failed compile is a loud cell in the table and makes the exit code 1;
- cold compile seconds: wall time of the first call after `torch._dynamo.reset()`, with
  Inductor's and jitopt's compile caches pointed at an empty folder (their on-disk caches would
  otherwise make a "cold" compile warm), and warm compile seconds (reset again, on-disk caches
  kept). Each backend's one-time start-up in the process (imports, compiler probing) is paid
  beforehand on a trivial function and reported on its own, so it does not land on whichever
  kernel comes first;
- the median time per call over interleaved rounds: each round calls every backend once, the
  order rotating, so the machine's drift lands on every column alike;
- achieved bandwidth: (bytes of the inputs, read once + the output, written once) / time.

The machine's copy bandwidth is measured in the same rounds: `dst.copy_(src)` of 16M float32
into a preallocated tensor (read + write = 128 MB), the reference for the 70% target; and, for
comparison, `src.clone()`, the same copy into a freshly allocated tensor, which pays the page
faults that any kernel returning a new tensor pays too. With glibc's defaults every allocation
over 32 MB is mapped afresh, so on a machine where page faults are slow `clone` is several times
slower than `copy` and dominates chain6 for every backend; the table records the environment
that changes this (MALLOC_*, THP_MEM_ALLOC_ENABLE, LD_PRELOAD).

Output: a markdown table on stdout, and kernels.json + kernels.md in --out.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.measure import summarize

# "dynamo": Dynamo's capture with the graph run by eager ops, the per-call floor every
# torch.compile backend pays (frame evaluation and guards) on top of its kernels.
BACKENDS = ("eager", "dynamo", "inductor", "jitopt")
COPY_NUMEL = 16 * 1024 * 1024  # 64 MB of float32
WARMUP_CALLS = 3
REFERENCES = ("copy", "clone")  # bandwidth probes timed in every kernel's rounds
CACHE_ENV = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "JITOPT_CACHE_DIR": "jitopt"}


def chain6(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid((x * 1.5 + y).relu() - 0.25) * y


def softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=-1)


def layernorm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w, b)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A function to compile, its inputs for a number of rows, and jitopt's targets: speedup
    over eager, over Inductor, and fraction of copy bandwidth (None: no bandwidth target)."""

    name: str
    fn: Callable[..., torch.Tensor]
    inputs: Callable[[int], tuple[torch.Tensor, ...]]
    min_vs_eager: float
    min_vs_inductor: float
    min_copy_fraction: float | None = None


KERNELS = {k.name: k for k in (
    Kernel("chain6", chain6, lambda rows: (torch.randn(rows, 4096), torch.randn(rows, 4096)),
           3.0, 1.0, 0.7),
    Kernel("softmax", softmax, lambda rows: (torch.randn(rows, 1024),), 1.0, 0.9),
    Kernel("layernorm", layernorm,
           lambda rows: (torch.randn(rows, 1024), torch.randn(1024), torch.randn(1024)), 1.0, 0.9),
)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                        help="folder for kernels.json and kernels.md (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds")
    parser.add_argument("--only", action="append", choices=list(KERNELS),
                        help="kernels to run (repeatable; default: all)")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated, from %(default)s; eager always runs")
    parser.add_argument("--size-scale", type=float, default=1.0,
                        help="scale the rows of every tensor (tests use tiny sizes)")
    args = parser.parse_args(argv)
    backends = {b.strip() for b in args.backends.split(",") if b.strip()}
    if unknown := sorted(backends - set(BACKENDS)):
        parser.error(f"unknown backend(s) {unknown}; choose from {list(BACKENDS)}")
    args.backends = [b for b in BACKENDS if b in backends or b == "eager"]
    args.only = args.only or list(KERNELS)
    if args.rounds < 1 or args.size_scale <= 0:
        parser.error("--rounds must be >= 1 and --size-scale > 0")
    return args


@contextlib.contextmanager
def compile_caches(path: str) -> Iterator[None]:
    """Inductor's and jitopt's on-disk compile caches live under `path` during the block
    (Inductor's in-memory ones are emptied on the way in and out); the environment is restored
    after, so nothing leaks past the block."""
    old = {name: os.environ.get(name) for name in CACHE_ENV}  # before the import, which sets one
    from torch._inductor.utils import clear_caches  # private, as in benchmarks/backends.py

    for name, sub in CACHE_ENV.items():
        os.environ[name] = os.path.join(path, sub)
    clear_caches()
    try:
        yield
    finally:
        clear_caches()
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def compiled(fn: Callable[..., Any], backend: str) -> Callable[..., Any]:
    if backend == "eager":
        return fn
    return torch.compile(fn, backend="eager" if backend == "dynamo" else backend, fullgraph=True)


def first_call(fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*inputs)
    return out, time.perf_counter() - start


def jitopt_fallbacks() -> int:
    import jitopt

    return sum(jitopt.counters["fallbacks"].values())


def check(out: torch.Tensor, reference: torch.Tensor, row: dict[str, Any]) -> bool:
    """Compare with eager; a mismatch goes into the row (status, error) and returns False."""
    try:
        torch.testing.assert_close(out, reference)
    except Exception as e:  # AssertionError, or not even a tensor of the right kind
        row.update(status="mismatch", error=" ".join(str(e).split())[:300])
        return False
    row["max_abs_diff"] = (out.float() - reference.float()).abs().max().item()
    return True


def _fail(row: dict[str, Any], e: Exception) -> None:
    row.update(status="error", error=f"{type(e).__name__}: {str(e).strip()[:300]}")


def _trivial(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def startup_s(backend: str, cache_root: str) -> float | None:
    """A backend's one-time cost in this process (imports, compiler probing), paid here on a
    trivial function, so that the first kernel's cold compile does not carry it alone."""
    torch._dynamo.reset()
    try:
        with compile_caches(tempfile.mkdtemp(prefix=f"startup-{backend}-", dir=cache_root)):
            return first_call(compiled(_trivial, backend), (torch.ones(8),))[1]
    except Exception:  # the kernels will fail too, and report why
        return None


def cold_compile(kernel: Kernel, backend: str, inputs: tuple[torch.Tensor, ...],
                 cache: str, row: dict[str, Any]) -> None:
    """First call after a Dynamo reset, with the compile caches in the empty folder `cache`."""
    torch._dynamo.reset()
    try:
        with compile_caches(cache):
            row["cold_compile_s"] = first_call(compiled(kernel.fn, backend), inputs)[1]
    except Exception as e:  # a failing backend is a cell in the table, not a crashed run
        _fail(row, e)


def prepare(kernel: Kernel, backend: str, inputs: tuple[torch.Tensor, ...],
            reference: torch.Tensor, cache: str | None,
            row: dict[str, Any]) -> Callable[[], Any] | None:
    """Compile again (warm: `cache` already holds this backend's artifacts), check the answer,
    warm up; the call to time, or None when the row failed."""
    if row["status"] != "ok":
        return None
    fallbacks = jitopt_fallbacks() if backend == "jitopt" else 0
    try:
        with compile_caches(cache) if cache else contextlib.nullcontext():
            fn = compiled(kernel.fn, backend)
            out, seconds = first_call(fn, inputs)
        if backend == "jitopt":  # its C++ builds in the background: time the kernels
            import jitopt

            jitopt.finish_compiles()
        if backend != "eager":
            row["warm_compile_s"] = seconds
        if backend == "jitopt":
            row["fallbacks"] = jitopt_fallbacks() - fallbacks
        if not check(out, reference, row):
            return None
        for _ in range(WARMUP_CALLS):
            fn(*inputs)
    except Exception as e:
        _fail(row, e)
        return None
    return lambda: fn(*inputs)


def reference_calls(numel: int) -> dict[str, Callable[[], Any]]:
    """The bandwidth probes: copy into a preallocated tensor, and into a fresh one."""
    src = torch.ones(numel)
    dst = torch.empty_like(src)
    calls = {"copy": lambda: dst.copy_(src), "clone": src.clone}
    for call in calls.values():
        for _ in range(WARMUP_CALLS):
            call()
    return calls


def time_rounds(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call: each round calls everything once, starting one further along each
    time, so drift and cache effects land on every column alike."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return times


def run_kernel(kernel: Kernel, args: argparse.Namespace, cache_root: str,
               copy_times: dict[str, list[float]]) -> dict[str, Any]:
    """One kernel: cold compiles, checks, interleaved timing. Appends the bandwidth probes'
    samples (timed in the same rounds) to `copy_times`."""
    torch.manual_seed(0)
    inputs = kernel.inputs(max(1, round(4096 * args.size_scale)))
    reference = kernel.fn(*inputs)
    rows = {b: {"backend": b, "status": "ok"} for b in args.backends}
    caches = {b: tempfile.mkdtemp(prefix=f"{kernel.name}-{b}-", dir=cache_root)
              for b in args.backends if b != "eager"}
    for backend, cache in caches.items():
        print(f"{kernel.name}: cold compile, {backend} ...", file=sys.stderr, flush=True)
        cold_compile(kernel, backend, inputs, cache, rows[backend])
    torch._dynamo.reset()  # the timed functions are compiled together, after the last reset
    calls = {b: call for b in args.backends
             if (call := prepare(kernel, b, inputs, reference, caches.get(b), rows[b]))}
    print(f"{kernel.name}: timing {len(calls)} backend(s), {args.rounds} rounds ...",
          file=sys.stderr, flush=True)
    calls.update(reference_calls(max(1, round(COPY_NUMEL * args.size_scale))))
    times = time_rounds(calls, args.rounds)
    moved = sum(t.nbytes for t in inputs) + reference.nbytes
    for backend, row in rows.items():
        if backend in times:
            row.update(vars(summarize(times[backend])))
            row["gbps"] = moved / row["median_s"] / 1e9
    for name in REFERENCES:
        copy_times[name] += times[name]
    return {"kernel": kernel.name, "shapes": [list(t.shape) for t in inputs],
            "bytes_moved": moved, "rows": list(rows.values())}


def copy_bandwidth(copy_times: dict[str, list[float]], numel: int) -> dict[str, float]:
    """GB/s of each probe from the median of all its samples (read + write)."""
    return {f"{name}_gbps": 2 * numel * 4 / statistics.median(samples) / 1e9
            for name, samples in copy_times.items() if samples}


def unmet_targets(kernel: Kernel, rows: dict[str, dict[str, Any]],
                  copy_gbps: float) -> list[str] | None:
    """jitopt's targets this kernel misses ([] when all are met); None when jitopt has no
    timing. Targets whose comparison column is absent are skipped."""
    jit = rows.get("jitopt", {}).get("median_s")
    if jit is None:
        return None
    missed = []
    for name, minimum in (("eager", kernel.min_vs_eager), ("inductor", kernel.min_vs_inductor)):
        other = rows.get(name, {}).get("median_s")
        if other is not None and other / jit < minimum:
            missed.append(f"{other / jit:.2f}x {name} < {minimum:g}x")
    if kernel.min_copy_fraction is not None:
        fraction = rows["jitopt"]["gbps"] / copy_gbps
        if fraction < kernel.min_copy_fraction:
            missed.append(f"{fraction:.0%} of copy BW < {kernel.min_copy_fraction:.0%}")
    return missed


def failures(summary: dict[str, Any]) -> list[str]:
    """Every row that is not ok: a mismatch against eager or a backend that failed."""
    return [f"{result['kernel']} / {row['backend']}: {row['status'].upper()}: {row['error']}"
            for result in summary["results"] for row in result["rows"] if row["status"] != "ok"]


def _cell(row: dict[str, Any] | None, value: Callable[[dict[str, Any]], str]) -> str:
    if row is None:
        return "-"
    return value(row) if row["status"] == "ok" else f"**{row['status'].upper()}**"


def _cells(rows: dict[str, dict[str, Any]], backends: list[str],
           value: Callable[[dict[str, Any]], str]) -> str:
    return " / ".join(_cell(rows.get(b), value) for b in backends) or "-"


def _ratio(rows: dict[str, dict[str, Any]], over: str) -> str:
    a, b = rows.get(over, {}).get("median_s"), rows.get("jitopt", {}).get("median_s")
    return f"{a / b:.2f}x" if a and b else "-"


def render_markdown(summary: dict[str, Any]) -> str:
    """The table: one row per kernel, times in ms, speedups as (other time / jitopt time)."""
    backends, copy_gbps = summary["backends"], summary["copy_gbps"]
    compiled_ = [b for b in backends if b != "eager"]
    header = ([f"{b} ms" for b in backends] + ["jitopt vs eager", "jitopt vs inductor",
              f"GB/s ({' / '.join(backends)})", f"% of copy BW ({' / '.join(backends)})",
              f"cold compile s ({' / '.join(compiled_) or '-'})", "jitopt targets"])
    lines = _preamble(summary) + ["", "| kernel | " + " | ".join(header) + " |",
                                  "|---" * (len(header) + 1) + "|"]
    for result in summary["results"]:
        rows = {r["backend"]: r for r in result["rows"]}
        cells = [_cell(rows.get(b), lambda r: f"{r['median_s'] * 1e3:.2f}") for b in backends]
        cells += [_ratio(rows, "eager"), _ratio(rows, "inductor"),
                  _cells(rows, backends, lambda r: f"{r['gbps']:.1f}"),
                  _cells(rows, backends, lambda r: f"{r['gbps'] / copy_gbps:.0%}"),
                  _cells(rows, compiled_, lambda r: f"{r['cold_compile_s']:.2f}"),
                  _targets_cell(result["unmet_targets"])]
        lines.append(f"| {result['kernel']} | " + " | ".join(cells) + " |")
    notes = [f"- **{line}**" for line in failures(summary)]
    notes += [f"- {r['kernel']} / jitopt: {row['fallbacks']} graph(s) fell back to ATen"
              for r in summary["results"] for row in r["rows"] if row.get("fallbacks")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _preamble(summary: dict[str, Any]) -> list[str]:
    startup = ", ".join(f"{b} {_seconds(s)}" for b, s in summary["startup_s"].items())
    return [f"Machine: {summary['machine']}.",
            f"Copy bandwidth this run: `copy_` into a preallocated tensor "
            f"{summary['copy_gbps']:.1f} GB/s; `clone()` (fresh output, page faults included) "
            f"{summary['clone_gbps']:.1f} GB/s. Allocator settings: "
            f"{_settings(summary['allocator'])}.",
            f"One-time start-up (the first compile in this process, of `x * 2 + 1`, before the "
            f"kernels): {startup or '-'}.",
            f"Command: `{summary['command']}` ({summary['rounds']} interleaved rounds, "
            f"median per call; speedups = other backend's time / jitopt's)."]


def _settings(settings: dict[str, str]) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in settings.items()) or "none (glibc defaults)"


def _seconds(value: float | None) -> str:
    return "failed" if value is None else f"{value:.2f} s"


def _targets_cell(unmet: list[str] | None) -> str:
    if unmet is None:
        return "-"
    return "met" if not unmet else "missed: " + "; ".join(unmet)


def allocator_settings() -> dict[str, str]:
    """Environment that changes how large tensors get their memory. By default glibc maps every
    allocation over 32 MB afresh, so each new 64 MB output pays its page faults: `clone` vs
    `copy` in the table shows the cost, which dominates chain6."""
    return {k: v for k, v in os.environ.items()
            if k.startswith("MALLOC_") or k in ("THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")}


def machine() -> str:
    from benchmarks.__main__ import machine_description

    return machine_description(torch.get_num_threads())


def main(argv: list[str] | None = None) -> int:
    """Run, print and write the table; 1 when any backend mismatched eager or failed."""
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_times: dict[str, list[float]] = {name: [] for name in REFERENCES}
    started = time.time()
    # Every compiled artifact of this run stays in this folder, deleted at the end.
    with tempfile.TemporaryDirectory(prefix="kernels-bench-") as cache_root, \
            compile_caches(cache_root):
        startup = {b: startup_s(b, cache_root) for b in args.backends if b != "eager"}
        results = [run_kernel(KERNELS[name], args, cache_root, copy_times)
                   for name in args.only]
    summary = {"machine": machine(), "command": "python -m benchmarks.kernels " + " ".join(
                   sys.argv[1:] if argv is None else argv), "allocator": allocator_settings(),
               "startup_s": startup,
               "backends": args.backends, "rounds": args.rounds, "size_scale": args.size_scale,
               "seconds": time.time() - started, "results": results,
               **copy_bandwidth(copy_times, max(1, round(COPY_NUMEL * args.size_scale)))}
    for result in results:
        rows = {r["backend"]: r for r in result["rows"]}
        result["unmet_targets"] = unmet_targets(KERNELS[result["kernel"]], rows,
                                                summary["copy_gbps"])
    summary["failures"] = failures(summary)
    table = render_markdown(summary)
    (out_dir / "kernels.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "kernels.md").write_text(table)
    print(table)
    print(f"written: {out_dir}/kernels.json, kernels.md", file=sys.stderr)
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
