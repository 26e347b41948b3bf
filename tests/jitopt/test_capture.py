"""Which capture path a graph takes: make_fx straight to ATen for plain inference, AOTAutograd
for anything that needs functionalization or gradients. Both must match eager."""

import pytest
import torch
from comparisons import assert_same

import jitopt


def _direct_captures(fn, *args, grad: bool = False) -> int:
    before = jitopt.counters["graphs"]["captured_direct"]
    with torch.set_grad_enabled(grad):
        expected = fn(*[a.clone() for a in args])
        actual = torch.compile(fn, backend="jitopt")(*args)
    assert_same(actual, expected)
    return jitopt.counters["graphs"]["captured_direct"] - before


def _softmax_scaled(x, w):
    return torch.softmax(x @ w * 0.5, -1)


def test_plain_inference_skips_aotautograd():
    assert _direct_captures(_softmax_scaled, torch.randn(4, 8), torch.randn(8, 8)) == 1


def test_inference_with_dynamic_sizes_skips_aotautograd():
    x = torch.randn(6, 8)
    torch._dynamo.mark_dynamic(x, 0)
    assert _direct_captures(_softmax_scaled, x, torch.randn(8, 8)) == 1


def test_gradients_go_through_aotautograd():
    w = torch.randn(8, 8, requires_grad=True)
    assert _direct_captures(_softmax_scaled, torch.randn(4, 8), w, grad=True) == 0


@pytest.mark.parametrize("grad", [False, True])
def test_input_mutation_goes_through_aotautograd(grad):
    def fn(x):
        x.mul_(2)
        return x.sin()

    x = torch.randn(5)
    x_eager = x.clone()
    assert _direct_captures(fn, x, grad=grad) == 0
    fn(x_eager)
    assert_same(x, x_eager)


def test_fresh_constants_skip_aotautograd():
    """Hugging Face's cache starts each layer from `torch.tensor([])`; make_fx lifts those as
    module constants. They were sent through AOTAutograd (6 s of GPT-2's prefill compile)."""
    def fn(k):
        empty = torch.tensor([], dtype=k.dtype)
        grown = torch.cat([empty.reshape(0, 4), k], 0)
        return grown * 2, grown.sum()

    compiled = torch.compile(fn, backend="jitopt")
    before = jitopt.counters["graphs"]["captured_direct"]
    with torch.no_grad():
        for rows in (3, 3):  # the second call must see the same constant, untouched
            k = torch.randn(rows, 4)
            assert_same(compiled(k), fn(k))
    assert jitopt.counters["graphs"]["captured_direct"] - before == 1


def test_constant_written_in_place_goes_through_aotautograd():
    def fn(x):
        table = torch.tensor([1.0, 2.0, 3.0])
        table.add_(x.sum())
        return x * table

    with torch.no_grad():
        x = torch.randn(3)
        assert _direct_captures(fn, x) == 0
