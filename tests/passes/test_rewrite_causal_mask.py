"""A mask built from sizes alone that is torch's causal mask becomes SDPA's is_causal flag."""

import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from comparisons import assert_same

import jitopt
from jitopt.passes.rewrite_causal_mask import SDPA_ANY_DEVICE, SDPA_CPU, rewrite_causal_mask


def _heads(seq=12, keys=None):
    keys = keys or seq
    return (torch.randn(2, 3, seq, 16), torch.randn(2, 3, keys, 16), torch.randn(2, 3, keys, 16))


def _run(fn, *args):
    with torch.no_grad():
        want = fn(*args)
        got = torch.compile(fn, backend="jitopt", options={"on_error": "raise"})(*args)
    assert_same(got, want, atol=2e-5, rtol=1e-4)
    return jitopt.counters["passes"]["rewrite_causal_mask"]


def _hf_style_mask(q, k, v):
    """As Hugging Face builds it: positions from arange, compared, then where(0, min)."""
    s = q.shape[2]
    positions = torch.arange(s)
    keep = positions[None, :] <= positions[:, None]
    mask = torch.where(keep, 0.0, torch.finfo(torch.float32).min)[None, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _inf_mask(q, k, v):
    s = q.shape[2]
    mask = torch.zeros(s, s).masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), -math.inf)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _bool_mask(q, k, v):
    s = q.shape[2]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.ones(s, s, dtype=torch.bool).tril())


def _expanded_mask(q, k, v):
    """Broadcast to the batch first, as Hugging Face's mask builders do: a view, evaluated
    at compile time at the size of its source."""
    s = q.shape[2]
    mask = torch.ones(s, s, dtype=torch.bool).tril()[None, None].expand(q.shape[0], 1, s, s)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("fn", [_hf_style_mask, _inf_mask, _bool_mask, _expanded_mask])
def test_causal_masks_become_the_flag(fn):
    assert _run(fn, *_heads()) == 1


def _minus_1e4_mask(q, k, v):
    """An older Hugging Face form: -10000 where masked. A score 10000 above the rest would
    still reach its key through exp, so this is not the causal flag's exact equivalent."""
    s = q.shape[2]
    mask = torch.zeros(s, s).masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), -1e4)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _bottom_right_mask(q, k, v):
    """Query i sees keys j <= i + (keys - queries): a decode step's mask, not torch's top-left
    causal one."""
    sq, sk = q.shape[2], k.shape[2]
    mask = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _sliding_window_mask(q, k, v):
    s = q.shape[2]
    keep = torch.ones(s, s, dtype=torch.bool).tril() & ~torch.ones(s, s, dtype=torch.bool).tril(-4)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def _input_mask(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("fn, keys", [(_minus_1e4_mask, None), (_bottom_right_mask, 20),
                                      (_sliding_window_mask, None)])
def test_other_masks_stay(fn, keys):
    assert _run(fn, *_heads(keys=keys)) == 0


def test_a_mask_passed_in_stays_even_when_causal():
    """Its values are only known at run time: the next call's mask may differ."""
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    assert _run(_input_mask, *_heads(), causal) == 0


def test_dynamic_sizes_leave_the_mask():
    q, k, v = _heads()
    for t in (q, k, v):
        torch._dynamo.mark_dynamic(t, 2)
    assert _run(_hf_style_mask, q, k, v) == 0


def _graph(target, causal_mask: bool) -> fx.GraphModule:
    """Before: SDPA over a mask built from arange (CPU flash or the any-device op, the forms
    rewrite_attention makes)."""
    graph = fx.Graph()
    q, k, v = (graph.placeholder(n) for n in "qkv")
    for node in (q, k, v):
        node.meta["val"] = torch.empty(1, 2, 8, 16)
    positions = graph.call_function(torch.ops.aten.arange.default, (8,))
    rows = graph.call_function(torch.ops.aten.unsqueeze.default, (positions, 1))
    keep = graph.call_function(torch.ops.aten.le.Tensor if causal_mask else
                               torch.ops.aten.ge.Tensor, (positions, rows))
    if target is SDPA_CPU:
        out = graph.call_function(SDPA_CPU, (q, k, v, 0.0, False),
                                  {"attn_mask": keep, "scale": 0.25})
    else:
        out = graph.call_function(SDPA_ANY_DEVICE, (q, k, v),
                                  {"attn_mask": keep, "dropout_p": 0.0, "scale": 0.25})
    graph.output(out)
    return fx.GraphModule(torch.nn.Module(), graph)


@pytest.mark.parametrize("target", [SDPA_CPU, SDPA_ANY_DEVICE])
def test_graph_before_and_after(target):
    gm = _graph(target, causal_mask=True)
    assert rewrite_causal_mask(gm) == 1
    (sdpa,) = [n for n in gm.graph.nodes if n.target is target]
    if target is SDPA_CPU:
        assert sdpa.args[3:] == (0.0, True) and sdpa.kwargs == {"scale": 0.25}
    else:
        assert sdpa.kwargs == {"dropout_p": 0.0, "scale": 0.25, "is_causal": True}
    assert [n.op for n in gm.graph.nodes] == ["placeholder"] * 3 + ["call_function", "output"]


def test_an_anti_causal_mask_is_not_taken():
    gm = _graph(SDPA_CPU, causal_mask=False)
    assert rewrite_causal_mask(gm) == 0
