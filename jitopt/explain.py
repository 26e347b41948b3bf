"""`jitopt.explain`: what jitopt does to a function, as a readable report."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from jitopt import capture
from jitopt.compiler import compile_graph
from jitopt.config import resolve
from jitopt.debug import counters
from jitopt.report import GraphReport, recording


@dataclasses.dataclass
class ExplainReport:
    graphs: list[GraphReport]
    graph_breaks: list[str]
    compile_seconds: float

    @property
    def fallbacks(self) -> list[str]:
        return [f for g in self.graphs for f in g.fallbacks + [x for a in g.aten
                                                                for x in a.fallbacks]]

    def to_dict(self) -> dict[str, Any]:
        return {"graphs": [dataclasses.asdict(g) for g in self.graphs],
                "graph_breaks": list(self.graph_breaks),
                "fallbacks": self.fallbacks,
                "compile_seconds": self.compile_seconds}

    def __str__(self) -> str:
        lines = [f"jitopt: {len(self.graphs)} graph(s), {len(self.graph_breaks)} graph "
                 f"break(s), {len(self.fallbacks)} fallback(s), compiled in "
                 f"{self.compile_seconds:.3f} s"]
        for brk in self.graph_breaks:
            lines.append(f"  graph break: {brk}")
        for g in self.graphs:
            lines += _graph_lines(g)
        return "\n".join(lines)


def _graph_lines(g: GraphReport) -> list[str]:
    lines = [f"graph {g.index}: {g.dynamo_ops} ops captured, {g.inputs} inputs "
             f"({g.symbolic_inputs} symbolic sizes), {g.seconds:.3f} s"]
    lines += [f"  fallback: {f}" for f in g.fallbacks]
    for a in g.aten:
        lines.append(f"  {a.kind}: {a.ops_captured} ATen ops -> {a.ops_final} after passes, "
                     f"{a.frozen_inputs} weights frozen, {a.seconds:.3f} s")
        for p in a.passes:
            lines.append(f"    pass {p['name']:<34} changed {p['changed']:>4}   "
                         f"{p['seconds'] * 1e3:7.2f} ms")
        if a.constant_bytes:
            parts = ", ".join(f"{dtype} {n / 2**20:.1f} MB"
                              for dtype, n in sorted(a.constant_bytes.items()))
            lines.append(f"    constants held: {sum(a.constant_bytes.values()) / 2**20:.1f} MB "
                         f"({parts})")
        for q in a.quantized_layers:
            if "reason" in q:
                lines.append(f"    kept {q['layer']} {q['shape']} in fp32: {q['reason']}")
                continue
            measured = (f", output SQNR {q['output_sqnr_db']:.1f} dB on the example inputs"
                        if "output_sqnr_db" in q else "")
            calibrated = (f", input range [{q['input_range'][0]:.4g}, {q['input_range'][1]:.4g}]"
                          if "input_range" in q else "")
            kernel = f" (on {q['kernel']}, fastest at this shape)" if "kernel" in q else ""
            lines.append(f"    quantized {q['layer']} {q['shape']} to {q['mode']}{kernel}: weight "
                         f"SQNR {q['weight_sqnr_db']:.1f} dB{measured}{calibrated}")
        error = a.quantization_error
        if error and error.get("outputs"):
            lines.append(f"    quantized graph against fp32 on the example inputs: cosine "
                         f"{error['cosine']:.6f}, max abs error {error['max_abs_error']:.3g}, "
                         f"relative error {error['relative_error']:.3g}")
        for p in a.partitions:
            why = (f" (fell back: {p['fallback_reason']})" if p["fallback_reason"] else
                   f" (declined: {p['declined_reason']})" if p.get("declined_reason") else "")
            lines.append(f"    partition {p['name']}: {p['ops']} ops on {p['target']}{why}")
        lines += [f"    fallback: {f}" for f in a.fallbacks]
    return lines


def explain(fn: Any, *example_inputs: Any, **options: Any) -> ExplainReport:
    """Compile `fn` (a function or module) for these inputs and report what happened: graphs,
    graph breaks and their reasons, ops per graph, each pass's changes and time, partitions
    and their targets, fallbacks and why, and the total compile time. Runs `fn` twice: once
    under Dynamo's own explain (for break reasons), once compiled. Like
    `torch._dynamo.explain`, it resets Dynamo's caches: functions compiled earlier in this
    process recompile on their next call."""
    config = resolve(options)
    dynamo = capture.dynamo_explain(fn, *example_inputs)
    breaks = [_break_line(r) for r in dynamo.break_reasons]

    def explaining_backend(gm, inputs):
        return compile_graph(gm, inputs, config)

    compiled = torch.compile(fn, backend=explaining_backend)
    start = time.perf_counter()
    with recording() as graphs:
        compiled(*example_inputs)
    seconds = sum(g.seconds for g in graphs) or (time.perf_counter() - start)
    counters["explain"]["calls"] += 1
    return ExplainReport(graphs, breaks, seconds)


def _break_line(reason: Any) -> str:
    """Dynamo's reason, cut to its first two lines (what and why), and where it happened."""
    text = " ".join(line.strip() for line in str(reason.reason).strip().splitlines()[:2])
    if reason.user_stack:
        frame = reason.user_stack[-1]
        text += f" (at {frame.filename}:{frame.lineno})"
    return text
