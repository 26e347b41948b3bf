"""Mark groups of pointwise, view and row-reduction ops that can run as one generated kernel."""

from __future__ import annotations

import itertools
import operator

import torch
import torch.fx as fx

from jitopt.passes.fusible_ops import (
    FUSIBLE, REDUCTIONS, SUPPORTED_DTYPES, VIEWS, is_multi_output, row_reduction)

GROUP_KEY = "fusion_group"

# A loop space: (shape, None) for pointwise work over `shape`, or (outer shape, row length)
# for a kernel that reduces rows. None is a view's: it fits any space.
Space = tuple[tuple, object] | None


def group_fusions(gm: fx.GraphModule) -> int:
    """Tag fusible nodes with node.meta["fusion_group"]; returns the number of groups.

    Heuristics, in the order they apply:
      1. vertical: a node joins its producers' groups when their loop spaces agree (same shape,
         or a pointwise node over the rows, or the row-scalars, of a reducing group), so
         pointwise chains fuse and softmax / layer norm become one kernel each;
      2. a merge never creates a cycle through a node outside the group;
      3. nothing is recomputed: a value with users outside its group is stored once, so no
         work is duplicated to fuse;
      4. horizontal: groups over the same space that read a common input merge, so the input
         is read once;
      5. views join a group only when all their users are in it (a view feeding a matmul stays
         a free ATen view), and groups with no arithmetic are dropped.
    Only tags: the graph is unchanged, so the pass is trivially semantics-preserving."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    groups = _Groups(order)
    for node in nodes:
        if _fusible(node, gm):
            groups.add(node, _space(node))
    groups.merge_horizontally(nodes)
    groups.drop_views_leaving()
    count = 0
    for members in groups.final():
        for n in members:
            n.meta[GROUP_KEY] = count
        count += 1
    return count


def _fusible(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return False  # joins with its producer, below
    if node.target not in FUSIBLE:
        return False
    if node.target is torch.ops.aten.arange.start_step and node.meta["val"].dtype.is_floating_point:
        return False  # eager's float arange arithmetic is not reproduced: left to ATen
    vals = [node.meta.get("val")] if node.target not in REDUCTIONS or not is_multi_output(
        node) else list(node.meta.get("val") or ())
    if not vals or not all(isinstance(v, torch.Tensor) and v.dtype in SUPPORTED_DTYPES
                           for v in vals):
        return False
    devices = {v.device.type for v in vals}
    devices |= {_device(a, gm) for a in node.all_input_nodes}
    if len(devices - {None}) != 1:
        return False
    return node.target not in REDUCTIONS or row_reduction(node) is not None


def _device(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """Where `node`'s tensor lives. Constants carry meta-device stand-ins: ask the module."""
    if node.op == "get_attr":
        value = getattr(gm, node.target, None)
        return value.device.type if isinstance(value, torch.Tensor) else None
    val = node.meta.get("val")
    return val.device.type if isinstance(val, torch.Tensor) else None


def _sizes(shape) -> tuple:
    """A shape as ints and sympy expressions: comparing SymInts directly would add guards."""
    return tuple(s.node.expr if isinstance(s, torch.SymInt) else int(s) for s in shape)


def _space(node: fx.Node) -> Space:
    if node.target in VIEWS:
        return None
    if node.target in REDUCTIONS:
        outer, length = row_reduction(node)
        return _sizes(outer), _sizes([length])[0]
    return _sizes(node.meta["val"].shape), None


def _merged(a: Space, b: Space) -> Space | bool:
    """The space of a group doing both, or False when they cannot share loops."""
    if a is None or b is None:
        return a if b is None else b
    (sa, ra), (sb, rb) = a, b
    if ra is None and rb is None:
        return a if sa == sb else False
    if ra is not None and rb is not None:
        return a if a == b else False
    reducing, shape = (a, sb) if ra is not None else (b, sa)
    outer, length = reducing
    fits = shape in (outer + (length,), outer + (1,), outer)
    return reducing if fits else False


class _Groups:
    """Union of node sets, with each group's space and the cycle check."""

    def __init__(self, order: dict[fx.Node, int]) -> None:
        self.order = order
        self.group_of: dict[fx.Node, int] = {}
        self.members: dict[int, set[fx.Node]] = {}
        self.space: dict[int, Space] = {}
        self.ids = itertools.count()

    def add(self, node: fx.Node, space: Space) -> None:
        gid = next(self.ids)
        self.group_of[node] = gid
        self.members[gid] = {node}
        self.space[gid] = space
        if node.target in REDUCTIONS:
            for user in node.users:  # a multi-output op's getitems always go with it
                if user.target is operator.getitem:
                    self.group_of[user] = gid
                    self.members[gid].add(user)
        for producer in node.all_input_nodes:
            other = self.group_of.get(producer)
            if other is not None and other != self.group_of[node]:
                self.try_merge(self.group_of[node], other)

    def try_merge(self, a: int, b: int) -> bool:
        space = _merged(self.space[a], self.space[b])
        if space is False or self._path_outside(a, b) or self._path_outside(b, a):
            return False
        keep, gone = (a, b) if a < b else (b, a)
        for n in self.members.pop(gone):
            self.group_of[n] = keep
            self.members[keep].add(n)
        self.space[keep] = space
        del self.space[gone]
        return True

    def _path_outside(self, src: int, dst: int) -> bool:
        """Does some member of `dst` depend on a member of `src` through a node in neither?"""
        inside = self.members[src] | self.members[dst]
        first = min(self.order[n] for n in self.members[src])
        stack = [p for n in self.members[dst] for p in n.all_input_nodes if p not in inside]
        seen: set[fx.Node] = set()
        while stack:
            n = stack.pop()
            if n in seen or self.order[n] < first:
                continue
            seen.add(n)
            for p in n.all_input_nodes:
                if p in self.members[src]:
                    return True
                if p not in inside:
                    stack.append(p)
        return False

    def merge_horizontally(self, nodes: list[fx.Node]) -> None:
        for node in nodes:
            readers = sorted({self.group_of[u] for u in node.users if u in self.group_of})
            base = readers[0] if readers else None
            for other in readers[1:]:
                if base == other or self.space[base] is None:
                    continue
                if self.space[base] == self.space[other] and self.try_merge(base, other):
                    base = min(base, other)

    def drop_views_leaving(self) -> None:
        """Remove views whose users are not all in their group (repeat: it can cascade)."""
        changed = True
        while changed:
            changed = False
            for node, gid in list(self.group_of.items()):
                if node.target not in VIEWS:
                    continue
                outside = [u for u in node.users if self.group_of.get(u) != gid]
                feeds_back = self.group_of.get(node.args[0]) == gid and len(outside) < len(
                    node.users)
                if outside and not feeds_back:  # feeds_back: removing it would make a cycle
                    self.members[gid].discard(node)
                    del self.group_of[node]
                    changed = True

    def final(self) -> list[list[fx.Node]]:
        """Groups with real work in them, each in graph order."""
        out = []
        for gid, members in sorted(self.members.items()):
            if any(n.target not in VIEWS and n.target is not operator.getitem for n in members):
                out.append(sorted(members, key=self.order.__getitem__))
        return out
