"""Linear layers with frozen weights onto oneDNN, with the weight reordered once."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping

import torch
import torch.fx as fx

from jitopt.passes.constants import add_constant, constant_value, is_constant
from jitopt.passes.graph_facts import is_op, tensor_meta

aten = torch.ops.aten
LINEAR = torch.ops.mkldnn._linear_pointwise.default


def prepack_linear_weights(gm: fx.GraphModule) -> int:
    """Rewrites addmm/mm with a frozen [K, N] float32 weight on CPU to mkldnn._linear_pointwise
    over the weight reordered once into oneDNN's blocked layout. Why: PyTorch's fp32 addmm goes
    to MKL, which runs at 40% of oneDNN's speed on this AMD machine (190 against 450-490
    GFLOP/s), and a packed weight spares every call the reorder. Safe: the same fp32 product
    (oneDNN accumulates in fp32, no implicit lower precision), from the frozen values."""
    if not torch.backends.mkldnn.is_available():
        return 0
    rewrites = 0
    for node in list(gm.graph.nodes):
        operands = linear_operands(node)
        if operands is None:
            continue
        x, weight_node, bias_node = operands
        packed = _packed(constant_value(weight_node).t())  # [N, K]: nn.Linear's layout
        packed_node = add_constant(gm, packed, node.name + "_packed", node)
        with gm.graph.inserting_before(node):
            linear = gm.graph.call_function(LINEAR, (x, packed_node, bias_node, "none", [], ""))
        linear.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(linear)
        gm.graph.erase_node(node)
        rewrites += 1
    return rewrites


# Packed copies by source weight, shared by every graph compiled over the same weights (a
# generation loop compiles prefill and decode graphs of one model): one reorder, one copy in
# memory. Keyed by the tensor owning the storage (by identity: a weak reference drops the
# entry with it); an entry is reused only for the same view at the same version, packed the
# same way.
_PACKED: dict[int, tuple[weakref.ref, dict]] = {}


def packed_once(weight: torch.Tensor, pack: Callable[[torch.Tensor], torch.Tensor]
                ) -> torch.Tensor:
    """pack(weight), computed once per weight (view and version) and packing function."""
    owner = weight._base if weight._base is not None else weight
    if owner.is_inference():  # no version counter to tell an in-place update: never shared
        return pack(weight)
    entry = _PACKED.get(id(owner))
    if entry is None or entry[0]() is not owner:
        entry = (weakref.ref(owner, lambda _, key=id(owner): _PACKED.pop(key, None)), {})
        _PACKED[id(owner)] = entry
    view = (tuple(weight.shape), weight.stride(), weight.storage_offset(), owner._version, pack)
    if view not in entry[1]:
        entry[1][view] = pack(weight)
    return entry[1][view]


def already_packed(weight: torch.Tensor, pack: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether packed_once(weight, pack) would return a copy an earlier graph made."""
    owner = weight._base if weight._base is not None else weight
    entry = _PACKED.get(id(owner))
    if entry is None or entry[0]() is not owner:  # (an inference tensor is never an owner)
        return False
    view = (tuple(weight.shape), weight.stride(), weight.storage_offset(), owner._version, pack)
    return view in entry[1]


def _packed(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's layout of `weight` for any batch size (a batch-size hint measured no faster)."""
    return packed_once(weight, onednn_layout)


def onednn_layout(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


# Device type -> the float dtypes a rewrite takes linears in: oneDNN's packed fp32 on CPU.
ONEDNN_LINEARS = {"cpu": (torch.float32,)}


def linear_operands(node: fx.Node, accept: Mapping[str, tuple[torch.dtype, ...]] = ONEDNN_LINEARS
                    ) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """(x, weight, bias) of `addmm(bias, x, weight)` or `mm(x, weight)` when a rewrite can take
    it: a frozen, non-empty 2-D weight whose device and dtype `accept` lists (by default
    oneDNN's: float32 on CPU), x and the bias of that dtype and device, a frozen bias of one
    value per output channel, no alpha/beta scaling."""
    if is_op(node, aten.addmm.default) and not node.kwargs:
        bias_node, x, weight_node = node.args
        if not is_constant(bias_node) or constant_value(bias_node).dim() != 1:
            return None
    elif is_op(node, aten.mm.default):
        (x, weight_node), bias_node = node.args, None
    else:
        return None
    if not is_constant(weight_node):
        return None
    weight, value = constant_value(weight_node), tensor_meta(x)
    ok = (weight.dim() == 2 and weight.dtype in accept.get(weight.device.type, ())
          and 0 not in weight.shape  # (oneDNN rejects an empty product; ATen's is exact)
          and weight.layout == torch.strided and value is not None
          and value.dtype == weight.dtype and value.device.type == weight.device.type
          and (bias_node is None or (constant_value(bias_node).dtype == weight.dtype
                                     # (addmm broadcasts a [1] bias; the kernels read [N])
                                     and constant_value(bias_node).shape == weight.shape[1:])))
    return (x, weight_node, bias_node) if ok else None
