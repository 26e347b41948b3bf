"""Attention written out by hand (matmul, scale, mask, softmax, matmul) to one fused call."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from jitopt.passes.graph_facts import is_op, only_user, static_shape, tensor_meta
from jitopt.passes.refresh_meta import refresh_meta_downstream

aten = torch.ops.aten
SDPA = aten._scaled_dot_product_flash_attention_for_cpu.default
SDPA_ANY_DEVICE = aten.scaled_dot_product_attention.default
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_TRANSPOSED = ((2, 3), (3, 2), (-1, -2), (-2, -1), (2, -1), (-1, 2), (3, -2), (-2, 3))


def rewrite_attention(gm: fx.GraphModule) -> int:
    """Rewrites softmax(q @ k^T * scale [+ mask]) @ v over [B, H, S, D] tensors (the ATen form of
    Hugging Face's eager GPT-2, BERT and Llama attention, GQA's repeated heads included) to one
    fused attention call that never materializes the [S, S] scores: ATen's CPU flash kernel on
    CPU, `scaled_dot_product_attention` on CUDA (ATen then picks its flash, memory-efficient
    or cuDNN kernel). Safe: both compute the same softmax attention with the same additive
    float mask and scale, accumulating in fp32; only tensors of one float dtype on one device,
    a last-dim softmax and a float mask broadcastable to the scores match, and the
    intermediates must have no other user."""
    rewrites, changed = 0, set()
    for softmax in list(gm.graph.nodes):
        match = _match(softmax)
        if match is None:
            continue
        q, k, v, mask, scale, out = match
        with gm.graph.inserting_before(out):
            result = (_fused_cpu if tensor_meta(q).device.type == "cpu" else _fused_cuda)(
                gm.graph, q, k, v, mask, scale)
        out.replace_all_uses_with(result)
        changed.add(result)
        rewrites += 1
    if changed:
        gm.graph.eliminate_dead_code()
        refresh_meta_downstream(gm, changed)
    return rewrites


def _fused_cpu(graph: fx.Graph, q, k, v, mask, scale) -> fx.Node:
    kwargs = {"attn_mask": mask} if mask is not None else {}
    fused = graph.call_function(SDPA, (q, k, v, 0.0, False), {**kwargs, "scale": scale})
    result = graph.call_function(operator.getitem, (fused, 0))
    fake_args = fx.node.map_arg(((q, k, v, 0.0, False), {**kwargs, "scale": scale}),
                                lambda n: n.meta["val"])
    with tensor_meta(q).fake_mode:
        fused.meta["val"] = SDPA(*fake_args[0], **fake_args[1])
    result.meta["val"] = fused.meta["val"][0]
    return result


def _fused_cuda(graph: fx.Graph, q, k, v, mask, scale) -> fx.Node:
    result = graph.call_function(SDPA_ANY_DEVICE, (q, k, v),
                                 {"attn_mask": mask, "dropout_p": 0.0, "scale": scale})
    # Which kernel runs is ATen's choice at run time (it needs the GPU to ask), so the output
    # layout is the one its CUDA kernels share: [B, Sq, H, Dv] memory seen as [B, H, Sq, Dv].
    tq, tv = tensor_meta(q), tensor_meta(v)
    batch, heads, queries, _ = tq.shape
    with tq.fake_mode:
        result.meta["val"] = tq.new_empty(batch, queries, heads, tv.shape[3]).transpose(1, 2)
    return result


def _match(softmax: fx.Node):
    """(q, k, v, mask, scale, output node) for an attention built around `softmax`, or None."""
    if not (is_op(softmax, aten._softmax.default) and softmax.args[1] in (-1, 3)
            and not softmax.args[2]):
        return None
    scores, mask = _split_mask(softmax.args[0])
    raw, scale = _split_scale(scores)
    qk = _through_views(raw)
    if qk is None or not is_op(qk, aten.bmm.default):
        return None
    q, k_t = _unflatten(qk.args[0]), _unflatten(qk.args[1])
    k = _untranspose(k_t)
    probs = only_user(softmax)
    pv = only_user(probs) if probs is not None and is_op(probs, *_VIEWS) else None
    if k is None or q is None or pv is None or not is_op(pv, aten.bmm.default):
        return None
    if pv.args[0] is not probs:
        return None
    v = _unflatten(pv.args[1])
    out = only_user(pv)
    if v is None or out is None or not is_op(out, *_VIEWS):
        return None
    if not _shapes_fit(q, k, v, mask, softmax, out):
        return None
    return q, k, v, mask, scale, out


def _split_mask(node: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """scores + mask -> (scores, mask); anything else has no mask."""
    if is_op(node, aten.add.Tensor) and not node.kwargs and _single_use(node):
        a, b = node.args
        if isinstance(a, fx.Node) and isinstance(b, fx.Node) and is_op(a, aten.mul.Tensor,
                                                                      aten.div.Tensor, *_VIEWS):
            return a, b
    return node, None


def _split_scale(node: fx.Node) -> tuple[fx.Node, float]:
    """raw * c or raw / c (a Python number) -> (raw, scale)."""
    if is_op(node, aten.mul.Tensor, aten.div.Tensor) and _single_use(node):
        raw, c = node.args
        if isinstance(c, (int, float)) and not isinstance(c, bool) and c != 0:
            return raw, float(c) if node.target is aten.mul.Tensor else 1.0 / float(c)
    return node, 1.0


def _through_views(node: fx.Node) -> fx.Node | None:
    """The bmm under `view(bmm, [B, H, Sq, Sk])`."""
    if is_op(node, *_VIEWS) and _single_use(node) and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def _unflatten(node: fx.Node) -> fx.Node | None:
    """The 4-D [B, H, S, D] tensor a bmm operand was flattened from: matmul's ATen form is
    view/_unsafe_view, maybe over a contiguous clone, maybe over an expand to the same shape."""
    if not (is_op(node, *_VIEWS) and _single_use(node)):
        return None
    x = node.args[0]
    if is_op(x, aten.clone.default) and _single_use(x):
        x = x.args[0]
    if is_op(x, aten.expand.default) and _single_use(x):
        if static_shape(x) is None or static_shape(x) != static_shape(x.args[0]):
            return None
        x = x.args[0]
    value = tensor_meta(x)
    return x if value is not None and value.dim() == 4 else None


def _untranspose(node: fx.Node | None) -> fx.Node | None:
    if node is None or not is_op(node, aten.transpose.int):
        return None
    return node.args[0] if tuple(node.args[1:]) in _TRANSPOSED else None


def _shapes_fit(q, k, v, mask, softmax, out) -> bool:
    tq, tk, tv, ts, to = (tensor_meta(n) for n in (q, k, v, softmax, out))
    if None in (tq, tk, tv, ts, to) or not all(static_shape(n) for n in (q, k, v, softmax)):
        return False  # symbolic sizes: comparing them here would specialize them
    devices = {t.device.type for t in (tq, tk, tv, ts)}
    dtypes = {t.dtype for t in (tq, tk, tv, ts)}
    # CPU: the float32 flash kernel. CUDA: every float type SDPA's kernels take.
    same = len(dtypes) == 1 and (dtypes <= {torch.float32} if devices == {"cpu"} else
                                 dtypes <= {torch.float32, torch.float16, torch.bfloat16})
    one_device = devices in ({"cpu"}, {"cuda"})
    shapes = (tq.shape[:2] == tk.shape[:2] == tv.shape[:2] and tk.shape[2] == tv.shape[2]
              and tq.shape[3] == tk.shape[3] and list(to.shape) == [*tq.shape[:3], tv.shape[3]])
    if mask is not None:
        tm = tensor_meta(mask)
        if tm is None or tm.dtype != tq.dtype or tm.device != tq.device or tm.dim() > 4:
            return False
        try:
            torch.broadcast_shapes(tm.shape, ts.shape)
        except RuntimeError:
            return False
    return same and one_device and shapes



def _single_use(node: fx.Node) -> bool:
    return only_user(node) is not None
