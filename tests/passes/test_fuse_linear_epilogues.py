"""Activations after a oneDNN linear become its post-op."""

import pytest
import torch
import torch.nn as nn
from comparisons import assert_same

import jitopt

AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"

ACTIVATIONS = {
    "relu": nn.ReLU(), "gelu": nn.GELU(), "gelu-tanh": nn.GELU(approximate="tanh"),
    "silu": nn.SiLU(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(),
}


def _wrapper(model, x, **options) -> str:
    with torch.no_grad():
        report = jitopt.explain(model, x, **options)
    return report.graphs[0].aten[0].wrapper_source


LINEARS = {  # which linear the layer becomes -> the options that make it so
    "blocked-weight kernel": {},
    "onednn": {"disabled_passes": ["pack_linear_weight_blocks"]},
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("shape", [(4, 16), (2, 3, 16)])
@pytest.mark.parametrize("linear", sorted(LINEARS))
def test_activation_becomes_the_post_op(name, shape, linear):
    if linear == "blocked-weight kernel" and not AVX512:
        pytest.skip("the blocked-weight linear kernel is written for AVX-512")
    model = nn.Sequential(nn.Linear(16, 24), ACTIVATIONS[name]).eval()
    x = torch.randn(*shape) * 3
    with torch.no_grad():
        got = torch.compile(model, backend="jitopt", options=LINEARS[linear])(x)
    assert_same(got, model(x), atol=2e-5, rtol=1e-4)
    assert jitopt.counters["passes"]["fuse_linear_epilogues"] == 1
    source = _wrapper(model, x, **LINEARS[linear])
    if linear == "onednn":
        assert source.count("_linear_pointwise") >= 1 and "cpp_fused" not in source
    else:  # one kernel call: the linear with its activation
        assert source.count("= cpp_fused_") == 1 and "_linear_pointwise" not in source


def test_not_fused_when_the_linear_output_is_also_used():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(16, 16)

        def forward(self, x):
            y = self.linear(x)
            return torch.relu(y), y

    model, x = Model().eval(), torch.randn(4, 16)
    with torch.no_grad():
        got, want = torch.compile(model, backend="jitopt")(x), model(x)
    assert_same(got, want, atol=1e-5)
    assert jitopt.counters["passes"]["fuse_linear_epilogues"] == 0
