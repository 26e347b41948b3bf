"""runtime/kv_buffer.py: appends give exactly torch.cat's values, write only new positions
when the cache is a buffer's frontier, copy otherwise (forks, foreign tensors), and free
their buffers with the last view."""

import gc

import torch

from jitopt.runtime import kv_buffer


def _step(cache, n=1):
    new = torch.randn(2, 3, n, 8)
    return kv_buffer.append(cache, new, -2), torch.cat([cache, new], -2)


def test_a_chain_of_steps_appends_in_place_after_the_first():
    cache = want = torch.randn(2, 3, 5, 8)
    before = dict(kv_buffer.counters)
    for _ in range(100):
        new = torch.randn(2, 3, 1, 8)
        cache, want = kv_buffer.append(cache, new, -2), torch.cat([want, new], -2)
        assert torch.equal(cache, want)
    copied = kv_buffer.counters["copied"] - before["copied"]
    in_place = kv_buffer.counters["appended_in_place"] - before["appended_in_place"]
    assert copied == 3 and in_place == 97  # exact size, then 64, then one growth to 128
    assert cache._base.shape[-2] == 128  # capacity at most twice the tokens held


def test_a_foreign_cache_first_gets_an_exact_buffer_then_a_growable_one():
    """The strides change between the first and second appends (exact, then capacity 64),
    not at the first growth: Dynamo's one stride recompile then falls in the first steps."""
    prefill = torch.randn(1, 40, 4, 16).transpose(1, 2)  # Hugging Face's [B, H, S, D] keys
    first = kv_buffer.append(prefill, torch.randn(1, 4, 1, 16), 2)
    assert first.is_contiguous() and first._base.shape[2] == 41
    second = kv_buffer.append(first, torch.randn(1, 4, 1, 16), 2)
    assert second._base.shape[2] == 64
    third = kv_buffer.append(second, torch.randn(1, 4, 1, 16), 2)
    assert third._base is second._base and third.stride() == second.stride()


def test_forked_continuations_do_not_see_each_other():
    prefix, _ = _step(torch.randn(2, 3, 4, 8))
    snapshot = prefix.clone()
    a, want_a = _step(prefix)
    b, want_b = _step(prefix)  # prefix is no longer the frontier: b must be a copy
    assert torch.equal(a, want_a) and torch.equal(b, want_b)
    assert torch.equal(prefix, snapshot)  # nothing prefix shows was written
    a2, want_a2 = _step(a)  # a is still its buffer's frontier
    assert torch.equal(a2, want_a2) and torch.equal(b, want_b)


def test_an_older_view_is_never_overwritten():
    c1, _ = _step(torch.randn(2, 3, 2, 8))
    c2, _ = _step(c1)
    keep = c2.clone()
    c3, want3 = _step(c1)  # back to an older cache (beam search): copies
    assert torch.equal(c2, keep) and torch.equal(c3, want3)


def test_max_tokens_caps_the_buffer():
    cache = torch.randn(1, 1, 10, 4)
    out = kv_buffer.append(cache, torch.randn(1, 1, 1, 4), 2, max_tokens=16)  # exact: 11
    out = kv_buffer.append(out, torch.randn(1, 1, 1, 4), 2, max_tokens=16)
    assert out._base.shape[2] == 16
    for _ in range(4):
        out = kv_buffer.append(out, torch.randn(1, 1, 1, 4), 2, max_tokens=16)
    assert out.shape[2] == 16 and out._base.shape[2] == 16
    past = kv_buffer.append(out, torch.randn(1, 1, 1, 4), 2, max_tokens=16)
    assert past.shape[2] == 17 and past._base is None  # a plain cat past the cap


def test_buffers_go_with_their_last_view():
    gc.collect()
    held = kv_buffer.held_buffers()
    cache, _ = _step(torch.randn(2, 3, 4, 8))
    cache, _ = _step(cache)
    assert kv_buffer.held_buffers() == held + 1
    del cache
    gc.collect()
    assert kv_buffer.held_buffers() == held


def test_autograd_and_mismatched_inputs_stay_plain_cat():
    cache = torch.randn(1, 2, 3, 4, requires_grad=True)
    out = kv_buffer.append(cache, torch.randn(1, 2, 1, 4), 2)
    assert out.grad_fn is not None and out._base is None
    mixed = kv_buffer.append(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 1, 4).double(), 2)
    assert mixed.dtype == torch.float64  # cat's type promotion, not a buffer
