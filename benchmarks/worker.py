"""Measure one model under each requested backend, in this one process.

Run by `python -m benchmarks` (one process per model, so models do not share allocator state
or compile caches); prints `@@ <backend>` as each backend starts, for the progress bar."""

from __future__ import annotations

import argparse
import gc
import json
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.backends import Backend, Unavailable, all_backends
from benchmarks.measure import PeakMemory, flops_of, time_calls
from benchmarks.models import MODELS, BenchModel


def dynamo_counts() -> dict[str, int]:
    """Graphs, graph breaks and compiled frames so far, from Dynamo's own counters (private)."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "frames": counters["frames"]["total"]}


def reset_compilers() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    gc.collect()


def make_call(bench: BenchModel, fn: Callable[..., Any]) -> Callable[[], Any]:
    if bench.kind == "forward":
        return lambda: fn(*bench.inputs)
    model = bench.module

    def generate() -> torch.Tensor:
        return model.generate(*bench.inputs, max_new_tokens=bench.new_tokens,
                              min_new_tokens=bench.new_tokens, do_sample=False,
                              pad_token_id=model.config.eos_token_id)
    return generate


def measure(bench: BenchModel, backend: Backend, args: argparse.Namespace,
            reference: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"backend": backend.name, "status": "ok"}
    reset_compilers()
    try:
        with PeakMemory() as memory:
            # Cold compile: preparing (export, convert, quantize) plus the first call, where
            # torch.compile backends compile.
            start = time.perf_counter()
            with backend.compile_context():
                fn = backend.prepare(bench.module, bench.inputs, args.threads, bench.kind)
                if bench.kind == "generate":
                    bench.module.forward = fn  # generate() calls self.forward each step
                call = make_call(bench, fn)
                out = call()
            row["first_call_s"] = time.perf_counter() - start
            if error := backend.verify():
                raise RuntimeError(error)
            if not args.first_call_only:
                after_first = dynamo_counts()
                timing = time_calls(call, warmup=args.warmup, iterations=args.iterations,
                                    max_seconds=args.max_seconds)
                row.update(vars(timing))
                counts = dynamo_counts()
                row.update(graphs=counts["graphs"], graph_breaks=counts["graph_breaks"],
                           recompiles=counts["frames"] - after_first["frames"])
                row.update(accuracy(bench, out, reference))
        row["peak_mb"] = memory.peak_mb
    except Unavailable as e:
        row.update(status="unavailable", error=str(e))
    except Exception as e:  # a failing backend is a cell in the table, not a crashed suite
        row.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        row["traceback"] = traceback.format_exc(limit=-6)
    finally:
        if bench.kind == "generate" and "forward" in vars(bench.module):
            del bench.module.forward
    return row


def accuracy(bench: BenchModel, out: Any, reference: Any) -> dict[str, Any]:
    if reference is None:
        return {}
    if bench.kind == "generate":
        return {"tokens_match": bool(torch.equal(out, reference))}
    return {"max_abs_diff": (out.float() - reference.float()).abs().max().item()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--backend", action="append", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=20.0)
    parser.add_argument("--first-call-only", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bench = MODELS[args.model](args.quick)
    bench.module.eval()
    backends = all_backends()
    result: dict[str, Any] = {"model": args.model, "kind": bench.kind,
                              "new_tokens": bench.new_tokens, "rows": []}
    with torch.inference_mode():
        reference = None if args.first_call_only else make_call(bench, bench.module)()
        if bench.kind == "forward" and not args.first_call_only:
            result["flops"] = flops_of(lambda: bench.module(*bench.inputs))
        for name in args.backend:
            print(f"@@ {name}", flush=True)
            result["rows"].append(measure(bench, backends[name], args, reference))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
