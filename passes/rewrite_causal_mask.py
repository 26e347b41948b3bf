"""An attention mask that is exactly torch's causal mask, built from sizes alone, to is_causal."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from jitopt.passes.constants import constant_value, is_constant
from jitopt.passes.graph_facts import has_symbolic_args, is_pure_op, static_shape

aten = torch.ops.aten
SDPA_CPU = aten._scaled_dot_product_flash_attention_for_cpu.default
SDPA_ANY_DEVICE = aten.scaled_dot_product_attention.default
# Elements of memory past which a node of a mask's subgraph is not evaluated at compile time
# (64 MB of float32; an expanded view spans only its source's).
MAX_EVALUATED = 2 ** 24


def rewrite_causal_mask(gm: fx.GraphModule) -> int:
    """Rewrites fused attention whose additive or boolean mask is computed from constants and
    static sizes alone (Hugging Face builds GPT-2's and Llama's from `arange`) and equals
    torch's causal mask, query i seeing keys j <= i, to the `is_causal` flag, which lets the
    kernel skip the masked half of the scores. Safe: the mask's subgraph is evaluated at
    compile time and compared element by element; a float mask counts only if its masked
    entries are -inf or below half the dtype's lowest value (so that a masked score's
    exponential is exactly 0, as causal skipping gives, unless the scores themselves come
    within half the dtype's range of overflowing) and the rest exactly 0. A subgraph that
    cannot be evaluated (too large, or an op that raises) leaves its mask as it is."""
    candidates = {node: mask for node in gm.graph.nodes
                  if (mask := _removable_mask(node)) is not None}
    values = _evaluate(gm, set(candidates.values()))
    rewrites = 0
    for node, mask in candidates.items():
        queries, keys = static_shape(node.args[0])[-2], static_shape(node.args[1])[-2]
        if mask in values and _is_causal(values[mask], queries, keys):
            _set_causal(node)
            rewrites += 1
    if rewrites:
        gm.graph.eliminate_dead_code()
    return rewrites


def _removable_mask(node: fx.Node) -> fx.Node | None:
    """The mask of a fused attention call (as rewrite_attention and capture make them: CPU
    flash with the mask and scale as keywords, or SDPA with keyword options) that is not
    causal already, runs no dropout, and has static q and k shapes."""
    if node.op != "call_function" or node.target not in (SDPA_CPU, SDPA_ANY_DEVICE):
        return None
    mask = node.kwargs.get("attn_mask")
    if not isinstance(mask, fx.Node):
        return None
    # Any other form (a positional mask, other options such as enable_gqa) is left alone.
    if node.target is SDPA_CPU:
        options, allowed = dict(zip(("dropout_p", "is_causal"), node.args[3:])), {"scale"}
    elif len(node.args) == 3:
        options, allowed = node.kwargs, {"dropout_p", "scale"}
    else:
        return None
    if set(node.kwargs) - allowed - {"attn_mask"} or options.get("dropout_p", 0.0) != 0.0 \
            or options.get("is_causal", False):
        return None
    if static_shape(node.args[0]) is None or static_shape(node.args[1]) is None:
        return None
    return mask


def _evaluate(gm: fx.GraphModule, wanted: set[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """Values of the `wanted` nodes that depend on constants and static sizes alone, computed
    in graph order over their ancestors (pure ATen ops and getitem, no symbolic sizes)."""
    ancestors = _ancestors(wanted)
    values: dict[fx.Node, object] = {}
    for node in gm.graph.nodes:
        if node not in ancestors:
            continue
        if is_constant(node):
            values[node] = constant_value(node)
            continue
        if not (is_pure_op(node) or node.target is operator.getitem):
            continue
        if any(n not in values for n in node.all_input_nodes) or has_symbolic_args(node) \
                or _span(node.meta.get("val")) > MAX_EVALUATED:
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
        try:
            with torch.no_grad():
                values[node] = node.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - only an optimization: the mask then stays
            continue
    return {n: v for n, v in values.items() if n in wanted and isinstance(v, torch.Tensor)}


def _span(value: object) -> int:
    """Elements of memory a tensor value spans (0 for anything else)."""
    if not isinstance(value, torch.Tensor) or value.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(value.shape, value.stride()))


def _ancestors(nodes: set[fx.Node]) -> set[fx.Node]:
    seen, stack = set(), list(nodes)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


def _is_causal(mask: torch.Tensor, queries: int, keys: int) -> bool:
    """Is `mask`, broadcast to [..., queries, keys], torch's top-left causal mask?"""
    if mask.dim() < 2 or queries == 0 or keys == 0:
        return False
    try:
        mask = mask.expand(*mask.shape[:-2], queries, keys)
    except RuntimeError:
        return False
    visible = torch.ones(queries, keys, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return bool((mask == visible).all())
    if not mask.dtype.is_floating_point:
        return False
    masked_below = torch.finfo(mask.dtype).min / 2
    return bool(((mask == 0) == visible).all() and ((mask <= masked_below) == ~visible).all())


def _set_causal(node: fx.Node) -> None:
    kwargs = {k: v for k, v in node.kwargs.items() if k != "attn_mask"}
    if node.target is SDPA_CPU:
        q, k, v = node.args[:3]
        node.args, node.kwargs = (q, k, v, 0.0, True), kwargs
    else:
        node.kwargs = {**kwargs, "is_causal": True}
