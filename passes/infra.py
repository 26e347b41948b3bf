"""One runner for every pass: timing, counting, verifying and dumping happen here, not in passes."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import torch.fx as fx

from jitopt.passes.verify import verify_graph

Pass = Callable[[fx.GraphModule], int]


@dataclasses.dataclass
class PassRecord:
    name: str
    changed: int
    seconds: float
    nodes_after: int


class PassFailed(RuntimeError):
    """A pass raised or broke an invariant; says which pass and which ran before it."""


def run_passes(gm: fx.GraphModule, passes: Sequence[Pass], *, verify_each: bool = False,
               dump: Callable[[str, Callable[[], str]], None] | None = None) -> list[PassRecord]:
    """Run `passes` in order on `gm` in place; return what each changed and how long it took."""
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    records: list[PassRecord] = []
    for p in passes:
        start = time.perf_counter()
        try:
            # No recompile between passes: they work on gm.graph, and regenerating the module's
            # Python for a graph of a thousand nodes costs more than most passes.
            changed = int(p(gm))
            if verify_each:
                verify_graph(gm, placeholders)
        except Exception as e:
            ran = ", ".join(r.name for r in records) or "none"
            raise PassFailed(f"pass {p.__name__} failed ({type(e).__name__}: {e}); "
                             f"passes run before it: {ran}") from e
        records.append(PassRecord(p.__name__, changed, time.perf_counter() - start,
                                  len(gm.graph.nodes)))
        if dump is not None:
            dump(f"{p.__name__}.py", lambda: gm.print_readable(print_output=False))
    if not verify_each:
        try:
            verify_graph(gm, placeholders)
        except Exception as e:
            raise PassFailed(f"graph invariants broken after the pipeline: {e}") from e
    return records
