"""The benchmark models on a CUDA device: eager, Inductor and jitopt, one process.

    python -m benchmarks.cuda                       # mlp, cnn, gpt2, bert in float16
    python -m benchmarks.cuda --dtype float32 --models mlp,gpt2 --out results.json

Why: jitopt's GPU path (generated Triton kernels around cuBLAS/cuDNN calls, attention as SDPA)
is built and tested on CPU; this is where it is timed when a GPU is at hand. Per model and
backend it prints the cold compile seconds (first call), the median milliseconds per call
(each call synchronized, after warm-up) and the largest difference from eager's output. A
backend that fails or differs beyond the dtype's tolerance is a loud cell and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.measure import time_calls
from benchmarks.models import MODELS

TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1}
BACKENDS: dict[str, Callable[[torch.nn.Module], Callable[..., Any]]] = {
    "eager": lambda model: model,
    "inductor": lambda model: torch.compile(model),
    "jitopt": lambda model: torch.compile(model, backend="jitopt"),
}


def on_device(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return value.to("cuda", dtype if value.is_floating_point() else value.dtype)


def run_model(name: str, dtype: torch.dtype) -> dict[str, dict[str, Any]]:
    bench = MODELS[name](False)
    if bench.kind != "forward":
        raise ValueError(f"{name!r} is a {bench.kind} model; this benchmark times forwards")
    model = bench.module.to("cuda", dtype)
    inputs = tuple(on_device(x, dtype) for x in bench.inputs)
    with torch.no_grad():
        expected = model(*inputs).float()
    row: dict[str, dict[str, Any]] = {}
    for backend, prepare in BACKENDS.items():
        torch._dynamo.reset()
        try:
            row[backend] = measure(prepare(model), inputs, expected, TOLERANCE[dtype])
        except Exception as error:  # a failed backend is a cell, not the end of the run
            traceback.print_exc()
            row[backend] = {"error": f"{type(error).__name__}: {error}"[:200]}
    return row


def measure(fn: Callable[..., Any], inputs: tuple, expected: torch.Tensor,
            tolerance: float) -> dict[str, Any]:
    def call() -> Any:
        out = fn(*inputs)
        torch.cuda.synchronize()
        return out

    with torch.no_grad():
        start = time.perf_counter()
        out = call()
        compile_s = time.perf_counter() - start
        error = (out.float() - expected).abs().max().item()
        timing = time_calls(call, warmup=10, iterations=200, max_seconds=5.0)
    cell = {"compile_s": compile_s, "median_ms": timing.median_s * 1e3, "max_abs_diff": error}
    if not error <= tolerance * max(1.0, expected.abs().max().item()):
        cell["error"] = f"output differs from eager by {error:.3g}"
    return cell


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mlp,cnn,gpt2,bert")
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.cuda: no CUDA device here; nothing to time", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "dtype": args.dtype, "models": {}}
    print(f"{results['device']}, torch {torch.__version__}, {args.dtype}")
    print(f"{'model':8} {'backend':9} {'compile s':>9} {'ms/call':>9} {'vs eager':>8} "
          f"{'max diff':>9}")
    failed = False
    for name in args.models.split(","):
        row = results["models"][name] = run_model(name, dtype)
        eager_ms = row["eager"].get("median_ms")
        for backend, cell in row.items():
            failed |= "error" in cell
            print(format_cell(name, backend, cell, eager_ms), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if failed else 0


def format_cell(name: str, backend: str, cell: dict[str, Any], eager_ms: float | None) -> str:
    if "median_ms" not in cell:
        return f"{name:8} {backend:9} FAILED: {cell['error']}"
    speedup = f"{eager_ms / cell['median_ms']:.2f}x" if eager_ms else "-"
    line = (f"{name:8} {backend:9} {cell['compile_s']:9.2f} {cell['median_ms']:9.3f} "
            f"{speedup:>8} {cell['max_abs_diff']:9.2e}")
    return line + (f"  WRONG: {cell['error']}" if "error" in cell else "")


if __name__ == "__main__":
    sys.exit(main())
