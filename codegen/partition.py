"""Split a graph into partitions, one per target, and lower each; failures fall back to ATen."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import torch.fx as fx
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from jitopt.codegen.targets import TARGETS, Declined, Target
from jitopt.errors import JitoptFallbackWarning


@dataclasses.dataclass
class PartitionRecord:
    name: str
    target: str
    ops: int
    fallback_reason: str | None = None  # the target failed (a bug or a missing compiler)
    declined_reason: str | None = None  # the target cannot express it (expected, quiet)


class _Supports(OperatorSupportBase):
    def __init__(self, target: Target) -> None:
        self.target = target

    def is_node_supported(self, submodules, node: fx.Node) -> bool:
        return node.op == "call_function" and self.target.supports(node)


def partition_graph(gm: fx.GraphModule, targets: Sequence[str], *, on_error: str,
                    background: bool = False
                    ) -> tuple[dict[str, object], list[PartitionRecord]]:
    """Carve partitions for each non-ATen target (in preference order) out of `gm`, in place.

    Returns the lowered artifact per submodule name, and a record per partition. What no
    target takes stays as plain ATen nodes, run inline by the wrapper. Only `gm.graph` is
    meaningful afterwards (the wrapper is generated from it); call gm.recompile() to run gm.
    `background`: targets that build with an external compiler may finish after returning,
    running the partition's ATen ops until then."""
    artifacts: dict[str, object] = {}
    records: list[PartitionRecord] = []
    for name in targets:
        if name == "aten":
            continue
        target = TARGETS[name]
        before = {n for n, _ in gm.named_children()}
        _carve(gm, target)
        subs = {}
        for sub_name, sub in list(gm.named_children()):
            if sub_name in before:
                continue
            new_name = "".join(c if c.isalnum() else "_" for c in f"{name}_{sub_name}")
            _rename_submodule(gm, sub_name, new_name)
            subs[new_name] = sub
        lowered = _lower_all(target, subs, on_error, background)
        for new_name, (artifact, record) in lowered.items():
            records.append(record)
            if record.target == target.name:
                artifacts[new_name] = artifact
            else:  # run its ATen ops inline: no per-call cost for a submodule
                _inline(gm, new_name)
    aten_ops = sum(1 for n in gm.graph.nodes if n.op == "call_function")
    records.append(PartitionRecord("inline", "aten", aten_ops))
    return artifacts, records


def _carve(gm: fx.GraphModule, target: Target) -> None:
    """Replace each partition the target takes by a call_module of a submodule. A target that
    proposes its own groups (fusion groups) gets exactly those; others get the maximal
    cycle-free sets of supported nodes."""
    if hasattr(target, "propose"):
        groups = [dict.fromkeys(g) for g in target.propose(gm) if g]
        if groups:
            fuse_by_partitions(gm, groups, prefix="fused_")
        return
    partitioner = CapabilityBasedPartitioner(gm, _Supports(target),
                                             allows_single_node_partition=True)
    partitioner.fuse_partitions(partitioner.propose_partitions())


def _lower_all(target: Target, subs: dict[str, fx.GraphModule], on_error: str,
               background: bool) -> dict[str, tuple[object, PartitionRecord]]:
    """Lower the partitions (together when the target can: one compiler run for a graph);
    each one that fails runs its ATen ops instead."""
    if hasattr(target, "lower_all"):
        try:
            results = target.lower_all(subs, background=background)
        except Exception as e:
            results = dict.fromkeys(subs, e)
    else:
        results = {}
        for name, sub in subs.items():
            try:
                results[name] = target.lower(sub)
            except Exception as e:
                results[name] = e
    lowered = {}
    for name, sub in subs.items():
        ops = sum(1 for n in sub.graph.nodes if n.op == "call_function")
        result = results[name]
        if not isinstance(result, Exception):
            lowered[name] = result, PartitionRecord(name, target.name, ops)
            continue
        reason = f"{type(result).__name__}: {result}"
        if isinstance(result, Declined):
            lowered[name] = sub, PartitionRecord(name, "aten", ops, declined_reason=reason)
            continue
        if on_error == "raise":
            raise result
        warnings.warn(f"jitopt: target {target.name!r} failed to compile partition {name} "
                      f"({ops} ops), running it on ATen instead: {reason}",
                      JitoptFallbackWarning, stacklevel=3)
        lowered[name] = sub, PartitionRecord(name, "aten", ops, fallback_reason=reason)
    return lowered


def _inline(gm: fx.GraphModule, name: str) -> None:
    """Put a carved partition's nodes back in place of its call_module."""
    call = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == name)
    sub = gm.get_submodule(name)
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_before(call):
        out = gm.graph.graph_copy(sub.graph, dict(zip(placeholders, call.args)))
    if isinstance(out, (tuple, list)):
        for user in list(call.users):  # fuse_by_partitions reads multiple outputs by getitem
            user.replace_all_uses_with(out[user.args[1]])
            gm.graph.erase_node(user)
    else:
        call.replace_all_uses_with(out)
    gm.graph.erase_node(call)
    delattr(gm, name)


def _rename_submodule(gm: fx.GraphModule, old: str, new: str) -> None:
    sub = getattr(gm, old)
    delattr(gm, old)
    gm.add_submodule(new, sub)
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == old:
            node.target = new
