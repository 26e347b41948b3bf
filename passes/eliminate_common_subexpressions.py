import torch.fx as fx

from jitopt.passes.graph_facts import is_pure_op, writes_input


def eliminate_common_subexpressions(gm: fx.GraphModule) -> int:
    """Merges repeated pure ops on the same arguments; safe because a mutation resets the table."""
    # Our own loop rather than fx's CSEPass: that one does not forget what it saw across an
    # in-place op, which would merge a read before a copy_ with a read after it.
    seen: dict[tuple, fx.Node] = {}
    merged = 0
    for node in list(gm.graph.nodes):
        if writes_input(node):
            seen.clear()
            continue
        if not is_pure_op(node):
            continue
        key = (node.target, _hashable(node.args), _hashable(node.kwargs))
        if key is None or None in key:
            continue
        earlier = seen.setdefault(key, node)
        if earlier is not node:
            node.replace_all_uses_with(earlier)
            gm.graph.erase_node(node)
            merged += 1
    return merged


def _hashable(value):
    """A hashable key for node arguments, or None when some argument cannot be compared."""
    if isinstance(value, (list, tuple)):
        items = tuple(_hashable(v) for v in value)
        return None if None in items and None not in value else (type(value).__name__, items)
    if isinstance(value, dict):
        return _hashable(tuple(sorted(value.items())))
    if isinstance(value, float) and value != value:  # NaN never equals itself
        return None
    try:
        hash(value)
    except TypeError:
        return None
    # Keep 1, 1.0 and True apart: they hash alike but mean different ops.
    return (type(value).__name__, value)
