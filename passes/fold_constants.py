import torch
import torch.fx as fx

from jitopt.passes.constants import add_constant, constant_value, is_constant
from jitopt.passes.graph_facts import has_symbolic_args, is_pure_op

# Folding must not trade a small weight for a huge materialized one (expand, repeat, outer
# products): a result more than this many times its largest input stays in the graph.
MAX_GROWTH = 2


def fold_constants(gm: fx.GraphModule) -> int:
    """Evaluates pure ops whose tensor inputs are all frozen constants and stores the result as a
    constant; safe because the op is deterministic, reads only frozen values, and takes no
    symbolic sizes."""
    folded = 0
    for node in list(gm.graph.nodes):
        if not _foldable(node):
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), constant_value)
        with torch.no_grad():
            value = node.target(*args, **kwargs)
        if not isinstance(value, torch.Tensor) or _grows(value, args, kwargs):
            continue
        node.replace_all_uses_with(add_constant(gm, value, node.name, before=node))
        gm.graph.erase_node(node)
        folded += 1
    return folded


def _foldable(node: fx.Node) -> bool:
    if not is_pure_op(node) or not isinstance(node.meta.get("val"), torch.Tensor):
        return False
    inputs = node.all_input_nodes
    if not inputs or not all(is_constant(n) for n in inputs):
        return False
    return not has_symbolic_args(node)


def _flat(values: list | tuple) -> list:
    out = []
    for v in values:
        out.extend(_flat(v) if isinstance(v, (list, tuple)) else [v])
    return out


def _grows(value: torch.Tensor, args, kwargs) -> bool:
    tensors = [a for a in _flat(list(args) + list(kwargs.values())) if isinstance(a, torch.Tensor)]
    if any(value.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in tensors):
        return False  # a view of a constant costs no memory
    largest = max((t.numel() for t in tensors), default=0)
    return value.numel() > MAX_GROWTH * max(largest, 1)
