"""Split a graph into partitions, one per target, and lower each; failures fall back to ATen."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import torch.fx as fx
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase

from jitopt.codegen.targets import TARGETS, Target
from jitopt.errors import JitoptFallbackWarning


@dataclasses.dataclass
class PartitionRecord:
    name: str
    target: str
    ops: int
    fallback_reason: str | None = None


class _Supports(OperatorSupportBase):
    def __init__(self, target: Target) -> None:
        self.target = target

    def is_node_supported(self, submodules, node: fx.Node) -> bool:
        return node.op == "call_function" and self.target.supports(node)


def partition_graph(gm: fx.GraphModule, targets: Sequence[str], *, on_error: str
                    ) -> tuple[dict[str, object], list[PartitionRecord]]:
    """Carve partitions for each non-ATen target (in preference order) out of `gm`, in place.

    Returns the lowered artifact per submodule name, and a record per partition. What no
    target takes stays as plain ATen nodes, run inline by the wrapper."""
    artifacts: dict[str, object] = {}
    records: list[PartitionRecord] = []
    for name in targets:
        if name == "aten":
            continue
        target = TARGETS[name]
        partitioner = CapabilityBasedPartitioner(gm, _Supports(target),
                                                 allows_single_node_partition=True)
        before = {n for n, _ in gm.named_children()}
        partitioner.fuse_partitions(partitioner.propose_partitions())
        for sub_name, sub in list(gm.named_children()):
            if sub_name in before:
                continue
            new_name = "".join(c if c.isalnum() else "_" for c in f"{name}_{sub_name}")
            _rename_submodule(gm, sub_name, new_name)
            artifacts[new_name], record = _lower(target, new_name, sub, on_error)
            records.append(record)
    aten_ops = sum(1 for n in gm.graph.nodes if n.op == "call_function")
    records.append(PartitionRecord("inline", "aten", aten_ops))
    return artifacts, records


def _lower(target: Target, name: str, sub: fx.GraphModule, on_error: str):
    ops = sum(1 for n in sub.graph.nodes if n.op == "call_function")
    try:
        return target.lower(sub), PartitionRecord(name, target.name, ops)
    except Exception as e:
        if on_error == "raise":
            raise
        reason = f"{type(e).__name__}: {e}"
        warnings.warn(f"jitopt: target {target.name!r} failed to compile partition {name} "
                      f"({ops} ops), running it on ATen instead: {reason}",
                      JitoptFallbackWarning, stacklevel=2)
        return sub, PartitionRecord(name, "aten", ops, fallback_reason=reason)


def _rename_submodule(gm: fx.GraphModule, old: str, new: str) -> None:
    sub = getattr(gm, old)
    delattr(gm, old)
    gm.add_submodule(new, sub)
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == old:
            node.target = new
