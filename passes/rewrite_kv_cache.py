"""Key/value caches grown by `torch.cat` each decode step to appends into a buffer with spare
capacity (`kv_cache=True`)."""

from __future__ import annotations

import torch
import torch.fx as fx

from jitopt.ops import kv_append
from jitopt.passes.graph_facts import is_mutated, is_op, is_output, tensor_meta

aten = torch.ops.aten


def rewrite_kv_cache(gm: fx.GraphModule) -> int:
    """Rewrites `cat([cache, new], dim)` where `cache` is a graph input and the result leaves
    the graph (the next step's cache: Hugging Face's DynamicCache, a `past_key_values` loop)
    to `jitopt.ops.kv_append`, which returns the same values as a view of a buffer with spare
    capacity and, when `cache` is that buffer's valid prefix, copies only `new`. Safe: it never
    writes anything an existing tensor shows (elsewhere it copies, like cat), and the result
    is only read in the graph (checked). Its strides differ from cat's (the capacity shows in
    them): ATen ops take any strides, and generated kernels check theirs at call time."""
    max_tokens = gm.meta.get("kv_cache_max_tokens")
    rewrites = 0
    for node in list(gm.graph.nodes):
        if not is_op(node, aten.cat.default) or not is_output(node) or is_mutated(node):
            continue
        tensors, dim = node.args[0], (node.args[1] if len(node.args) > 1 else 0)
        if len(tensors) != 2 or tensors[0].op != "placeholder" or is_mutated(tensors[0]):
            continue
        cache, new = (tensor_meta(t) for t in tensors)
        if (cache is None or new is None or cache.dim() < 2 or cache.dtype != new.dtype
                or not cache.dtype.is_floating_point or cache.dim() != new.dim()):
            continue
        with gm.graph.inserting_before(node):
            append = gm.graph.call_function(kv_append, (*tensors, dim, max_tokens))
        append.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(append)
        gm.graph.erase_node(node)
        rewrites += 1
    return rewrites
