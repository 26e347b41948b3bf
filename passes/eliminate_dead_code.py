import torch.fx as fx

from jitopt.passes.constants import delete_unused_constants


def eliminate_dead_code(gm: fx.GraphModule) -> int:
    """Removes nodes whose values nobody uses; safe because fx keeps impure (mutating) ops."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    delete_unused_constants(gm)
    return before - len(gm.graph.nodes)
