"""What one compilation did, recorded as it happens; `jitopt.explain` renders it."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any


@dataclasses.dataclass
class AtenGraphReport:
    """One ATen graph AOTAutograd produced: "inference", "forward" or "backward"."""

    kind: str
    ops_captured: int = 0
    ops_final: int = 0
    frozen_inputs: int = 0
    passes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    partitions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    fallbacks: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    wrapper_source: str = ""
    kernel_sources: list[str] = dataclasses.field(default_factory=list)  # generated libraries
    # Per quantized layer: its name, mode, [N, K] shape, the weight's SQNR in dB and the
    # output's SQNR on the example inputs.
    quantized_layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # The compiled graph against the fp32 one on the example inputs: cosine, max abs error.
    quantization_error: dict[str, Any] | None = None
    constant_bytes: dict[str, int] = dataclasses.field(default_factory=dict)  # by dtype


@dataclasses.dataclass
class GraphReport:
    """One graph Dynamo captured and handed to the backend."""

    index: int
    dynamo_ops: int
    inputs: int
    symbolic_inputs: int
    aten: list[AtenGraphReport] = dataclasses.field(default_factory=list)
    fallbacks: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


_recorders: list[list[GraphReport]] = []


@contextlib.contextmanager
def recording() -> Iterator[list[GraphReport]]:
    """Collect a GraphReport for every graph compiled inside this block."""
    found: list[GraphReport] = []
    _recorders.append(found)
    try:
        yield found
    finally:
        _recorders.remove(found)


def new_graph_report(**fields: Any) -> GraphReport:
    report = GraphReport(index=sum(len(r) for r in _recorders[-1:]), **fields)
    for recorder in _recorders:
        recorder.append(report)
    return report


def discard_graph_report(report: GraphReport) -> None:
    """Forget a report whose compile Dynamo restarted (it will be compiled again)."""
    for recorder in _recorders:
        if report in recorder:
            recorder.remove(report)
