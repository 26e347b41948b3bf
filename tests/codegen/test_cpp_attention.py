"""The CPU target's attention kernel against eager attention: layouts, masks, causality, and
the shapes it declines (those stay on ATen's fused kernel)."""

import math

import pytest
import torch
import torch.nn.functional as F
from comparisons import assert_same

import jitopt

pytestmark = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                                reason="the attention kernel is written for AVX-512")


def _attention(q, k, v, mask=None, causal=False, scale=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          scale=scale)


def _eager_math(q, k, v, mask=None, causal=False, scale=None):
    """Attention in float64, the reference the fused kernels are both compared with."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) * (scale or 1 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores + mask.double()
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, -math.inf)
    return (torch.softmax(scores, -1) @ v).float()


def _run(fn, *args, **kwargs):
    with torch.no_grad():
        got = torch.compile(fn, backend="jitopt")(*args, **kwargs)
    return got, jitopt.counters["kernels"]["cpp_attention"]


def _heads(batch, heads, seq, dim):
    """[B, H, S, D] views of [B, S, H, D] tensors, as a fused QKV projection leaves them."""
    return [torch.randn(batch, seq, heads, dim).transpose(1, 2) for _ in range(3)]


@pytest.mark.parametrize("batch, heads, seq, dim", [
    (2, 3, 37, 32),   # rows not a multiple of the 4-row tile, keys not of the vector
    (1, 2, 128, 64),
    (1, 1, 5, 16),
    (2, 2, 70, 80),   # head size 80: one 64-wide and one 16-wide tile
    (1, 1, 200, 128),
])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_eager(batch, heads, seq, dim, causal):
    q, k, v = _heads(batch, heads, seq, dim)
    got, kernels = _run(_attention, q, k, v, causal=causal)
    assert kernels == 1
    assert_same(got, _eager_math(q, k, v, causal=causal), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 24), (2, 1, 24, 24), (24, 24), (1, 3, 24, 24)])
def test_additive_masks_broadcast(mask_shape):
    q, k, v = _heads(2, 3, 24, 32)
    mask = torch.randn(mask_shape)
    got, kernels = _run(_attention, q, k, v, mask)
    assert kernels == 1
    assert_same(got, _eager_math(q, k, v, mask), atol=2e-5, rtol=1e-4)


def test_scale_and_contiguous_operands():
    q, k, v = [torch.randn(2, 4, 33, 48) for _ in range(3)]
    got, kernels = _run(_attention, q, k, v, scale=0.3)
    assert kernels == 1
    assert_same(got, _eager_math(q, k, v, scale=0.3), atol=2e-5, rtol=1e-4)


def test_fully_masked_row_gives_zeros_like_atens_kernel():
    q, k, v = _heads(1, 2, 8, 16)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 3, :] = -math.inf
    got, kernels = _run(_attention, q, k, v, mask)
    want = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=mask)[0]
    assert kernels == 1
    assert_same(got, want, atol=2e-5, rtol=1e-4)
    assert not got[:, :, 3].any()


def test_output_feeds_the_next_kernel():
    """The attention output goes through the usual transpose and reshape to a projection."""
    q, k, v = _heads(2, 4, 16, 16)
    w = torch.randn(64, 64)

    def block(q, k, v):
        out = _attention(q, k, v).transpose(1, 2).reshape(2, 16, 64)
        return torch.relu(out @ w) + 1

    got, kernels = _run(block, q, k, v)
    assert kernels == 1
    want = torch.relu(_eager_math(q, k, v).transpose(1, 2).reshape(2, 16, 64) @ w) + 1
    assert_same(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["head size 24", "too many keys", "float64", "dynamic"])
def test_declined_shapes_stay_on_aten(case):
    q, k, v = _heads(1, 2, 2000 if case == "too many keys" else 16,
                     24 if case == "head size 24" else 32)
    if case == "float64":
        q, k, v = q.double(), k.double(), v.double()
    if case == "dynamic":
        for t in (q, k, v):
            torch._dynamo.mark_dynamic(t, 2)
    got, kernels = _run(_attention, q, k, v)
    assert kernels == 0
    assert_same(got, _attention(q, k, v), atol=2e-5, rtol=1e-4)


def test_training_graph_keeps_atens_kernel_and_gradients():
    q, k, v = [t.requires_grad_() for t in _heads(1, 2, 16, 32)]
    got = torch.compile(_attention, backend="jitopt")(q, k, v)
    got.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    _attention(q, k, v).sum().backward()
    assert jitopt.counters["kernels"]["cpp_attention"] == 0
    for g, t in zip(grads, (q, k, v)):
        assert_same(g, t.grad, atol=1e-5, rtol=1e-4)


def test_layers_of_one_shape_share_one_kernel():
    q, k, v = _heads(1, 2, 16, 32)

    def two_layers(q, k, v):
        first = _attention(q, k, v)
        return _attention(first * 2, k, v)

    got, kernels = _run(two_layers, q, k, v)
    assert kernels == 2
    assert_same(got, _eager_math(_eager_math(q, k, v) * 2, k, v), atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        report = jitopt.explain(two_layers, q, k, v).graphs[0].aten[0]
    assert "".join(report.kernel_sources).count('extern "C" void attention_') == 1


def test_a_handed_over_buffer_of_another_layout_is_not_written():
    """The memory plan may hand the kernel a dead buffer; one whose strides differ from what
    the kernel writes (it came from ATen ops while kernels were building) is replaced."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from jitopt.codegen.cpp_target import CppTarget

    def sdpa(q, k, v):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)[0]

    q, k, v = _heads(1, 2, 8, 16)
    with FakeTensorMode() as mode:
        gm = make_fx(sdpa)(*(mode.from_tensor(t) for t in (q, k, v)))
    artifact = CppTarget().lower_all({"g": gm})["g"]
    wrong = torch.zeros(1, 2, 8, 16)  # contiguous: the kernel writes [B, S, H, D] memory
    got = artifact(q, k, v, out0=wrong)
    assert got is not wrong and not wrong.any()
    assert_same(got, sdpa(q, k, v), atol=2e-5, rtol=1e-4)
