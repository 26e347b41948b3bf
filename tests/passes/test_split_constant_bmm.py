"""split_constant_bmm: a batched matmul over frozen weights becomes one frozen-weight matmul
per batch entry, so the quantize modes take per-head and per-expert weights; checked against
the eager reference quantizer applied entry by entry."""

import pytest
import torch
import torch.nn as nn
from reference_quantizer import (
    Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear)

import jitopt

REFERENCES = {"int8": Int8DynamicLinear, "int8-weight-only": Int8WeightOnlyLinear,
              "int4-weight-only": lambda linear: Int4WeightOnlyLinear(linear, 32)}


class PerHeadProjection(nn.Module):
    """x [H, M, K] times one [K, N] weight per head, as torch.bmm or as an einsum."""

    def __init__(self, heads: int = 4, einsum: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(heads, 64, 48) / 8)
        self.einsum = einsum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.einsum:  # x [B, H, M, K]
            return torch.einsum("bhmk,hkn->bhmn", x, self.weight)
        return torch.relu(torch.bmm(x, self.weight)) * 2


def _entry_by_entry(model: PerHeadProjection, mode: str, x: torch.Tensor) -> torch.Tensor:
    """The model with each head's weight quantized by the reference quantizer."""
    outs = []
    for h, weight in enumerate(model.weight.detach()):
        linear = nn.Linear(*weight.shape, bias=False)
        linear.weight.data = weight.t().contiguous()
        layer = REFERENCES[mode](linear)
        outs.append(layer(x[:, h] if model.einsum else x[h]))
    y = torch.stack(outs, 1 if model.einsum else 0)
    return y if model.einsum else torch.relu(y) * 2


@pytest.mark.parametrize("mode", sorted(REFERENCES))
@pytest.mark.parametrize("einsum", [False, True])
def test_each_head_is_quantized_as_a_linear(mode, einsum):
    torch.manual_seed(0)
    model = PerHeadProjection(einsum=einsum).eval()
    x = torch.randn(2, 4, 10, 64) if einsum else torch.randn(4, 10, 64)
    options = {"quantize": mode, **({"quantize_group_size": 32} if "int4" in mode else {})}
    with torch.no_grad():
        got = torch.compile(model, backend="jitopt", options=options)(x)
        want, fp32 = _entry_by_entry(model, mode, x), model(x)
    assert jitopt.counters["passes"]["split_constant_bmm"] == 1
    assert sum(v for k, v in jitopt.counters["passes"].items()
               if k.startswith("quantize_linear")) == 4
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), fp32.flatten(), 0)
    assert cosine > (0.995 if "int4" in mode else 0.999)


def test_without_quantize_a_bmm_stays_one_call():
    model, x = PerHeadProjection().eval(), torch.randn(4, 10, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="jitopt")(x), model(x))
    assert jitopt.counters["passes"]["split_constant_bmm"] == 0


def test_two_activations_are_not_split():
    """bmm of two runtime tensors (attention's scores) is not a layer over weights."""
    a, b = torch.randn(4, 10, 64), torch.randn(4, 64, 10)
    compiled = torch.compile(torch.bmm, backend="jitopt", options={"quantize": "int8"})
    torch.testing.assert_close(compiled(a, b), torch.bmm(a, b))
    assert jitopt.counters["passes"]["split_constant_bmm"] == 0
