"""Measure one model under each requested backend, in this one process.

Run by `python -m benchmarks` (one process per model, so models do not share allocator state
or compile caches); prints `@@ <backend>` as each backend starts, for the progress bar."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.backends import Backend, Unavailable, all_backends
from benchmarks.measure import PeakMemory, flops_of, summarize
from benchmarks.models import MODELS, BenchModel


# Pause before each timed call (see time_interleaved): ONNX Runtime's and OpenVINO's pools
# spin briefly after a call, and on two cores that time is taken from the next backend. Short,
# so torch's OpenMP threads do not go to sleep (50 ms doubled eager's median on the MLP).
SETTLE_S = 0.005


def dynamo_counts() -> dict[str, int]:
    """Graphs, graph breaks and compiled frames so far, from Dynamo's own counters (private)."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "frames": counters["frames"]["total"]}


def jitopt_fallbacks() -> int:
    """Graphs or partitions jitopt has run uncompiled so far (a compile that failed)."""
    import jitopt

    return sum(jitopt.counters["fallbacks"].values())


def finish_background_builds() -> None:
    import jitopt

    jitopt.finish_compiles()


def make_call(bench: BenchModel, fn: Callable[..., Any]) -> Callable[[], Any]:
    if bench.kind == "forward":
        return lambda: fn(*bench.inputs)
    model = bench.module

    def generate() -> torch.Tensor:
        return model.generate(*bench.inputs, max_new_tokens=bench.new_tokens,
                              min_new_tokens=bench.new_tokens, do_sample=False,
                              pad_token_id=model.config.eos_token_id)
    return generate


@dataclasses.dataclass
class Prepared:
    """A backend compiled and checked, ready for the timing rounds."""

    row: dict[str, Any]
    call: Callable[[], Any] | None = None
    forward: Callable[..., Any] | None = None  # generation: what model.forward becomes


def prepare(bench: BenchModel, backend: Backend, args: argparse.Namespace,
            reference: Any) -> Prepared:
    """Compile `backend`, time its cold start, check its answer, warm it up; a failure becomes
    the row's status, never an exception."""
    row: dict[str, Any] = {"backend": backend.name, "status": "ok"}
    # Earlier columns leave a large heap (compiled graphs, frozen copies of the weights). Frozen
    # out of the cyclic collector's reach, it no longer slows this column's compile: each
    # backend's cold start is measured as if it came first.
    gc.collect()
    gc.freeze()
    before, fallbacks = dynamo_counts(), jitopt_fallbacks()
    try:
        with PeakMemory() as memory:
            # Cold compile: preparing (export, convert, quantize) plus the first call, where
            # torch.compile backends compile.
            start = time.perf_counter()
            with backend.compile_context():
                fn = backend.prepare(bench.module, bench.inputs, args.threads, bench.kind)
                use_forward(bench, fn)
                call = make_call(bench, fn)
                out = call()
            row["first_call_s"] = time.perf_counter() - start
            # jitopt builds its C++ kernels in the background while the first calls run ATen
            # ops: wait for them (reported) so the timed calls run the kernels.
            start = time.perf_counter()
            finish_background_builds()
            row["background_build_wait_s"] = time.perf_counter() - start
            if error := backend.verify():
                raise RuntimeError(error)
            for _ in range(0 if args.first_call_only else args.warmup):
                call()
        if jitopt_fallbacks() > fallbacks:  # timing ATen under jitopt's name would mislead
            raise RuntimeError("jitopt fell back to running ATen uncompiled (see its "
                               "JitoptFallbackWarning)")
        row["peak_mb"] = memory.peak_mb
        after = dynamo_counts()
        row.update(graphs=after["graphs"] - before["graphs"], recompiles=0,
                   graph_breaks=after["graph_breaks"] - before["graph_breaks"])
        row.update(accuracy(bench, out, reference))
        return Prepared(row, call, fn)
    except Unavailable as e:
        row.update(status="unavailable", error=str(e))
    except Exception as e:  # a failing backend is a cell in the table, not a crashed suite
        row.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        row["traceback"] = traceback.format_exc(limit=-6)
    finally:
        use_forward(bench, None)
    return Prepared(row)


def use_forward(bench: BenchModel, fn: Callable[..., Any] | None) -> None:
    """Generation calls self.forward each step: point it at this backend's (None: the model's)."""
    if bench.kind != "generate":
        return
    if fn is None:
        vars(bench.module).pop("forward", None)
    else:
        bench.module.forward = fn


def time_interleaved(bench: BenchModel, ready: list[Prepared], args: argparse.Namespace) -> None:
    """Time every ready backend in rounds, one call each per round, so the machine's drift
    (large here) lands on all columns alike instead of on whichever ran last."""
    from torch._dynamo.utils import counters

    times: dict[str, list[float]] = {p.row["backend"]: [] for p in ready}
    deadline = time.perf_counter() + args.max_seconds * max(len(ready), 1)
    rounds = 0
    while rounds < args.iterations and (rounds < 3 or time.perf_counter() < deadline):
        order = list(ready)
        random.Random(rounds).shuffle(order)  # no column always follows the same neighbour
        for p in order:
            use_forward(bench, p.forward)
            time.sleep(SETTLE_S)  # peers' pools idle first (see SETTLE_S)
            frames = counters["frames"]["total"]
            start = time.perf_counter()
            p.call()
            times[p.row["backend"]].append(time.perf_counter() - start)
            p.row["recompiles"] += counters["frames"]["total"] - frames
        rounds += 1
    use_forward(bench, None)
    for p in ready:
        p.row.update(vars(summarize(times[p.row["backend"]])))


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
    # Every compiled backend stays alive for the interleaved rounds, so one code object holds
    # several backends' graphs (generation: a few each); Dynamo's default limit of 8 would
    # silently send the later ones to eager.
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
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
        prepared = []
        for name in args.backend:
            print(f"@@ {name}", flush=True)
            prepared.append(prepare(bench, backends[name], args, reference))
        if not args.first_call_only:
            time_interleaved(bench, [p for p in prepared if p.call is not None], args)
        result["rows"] = [p.row for p in prepared]
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
