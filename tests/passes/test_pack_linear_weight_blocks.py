"""Linears over frozen float32 weights to the blocked-weight kernel: which ones, eager's
values, one packed copy per weight."""

import importlib

import pytest
import torch
import torch.nn as nn
from comparisons import assert_same

import jitopt

# The pass takes linears only where its kernel runs; the op's reference runs anywhere.
pytestmark = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                                reason="the blocked-weight linear kernel is written for AVX-512")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 70), nn.ReLU(),
                         nn.Linear(70, 8, bias=False)).eval()


def _run(model, x, **options):
    with torch.no_grad():
        got = torch.compile(model, backend="jitopt",
                            options={"on_error": "raise", **options})(x)
        return got, model(x)


@pytest.mark.parametrize("rows", [1, 32, 128])
def test_an_mlp_runs_on_the_kernel_with_its_activations_fused(rows):
    got, want = _run(_mlp(), torch.randn(rows, 64))
    assert_same(got, want, atol=1e-5, rtol=1e-5)
    assert jitopt.counters["passes"]["pack_linear_weight_blocks"] == 3
    assert jitopt.counters["passes"]["fuse_linear_epilogues"] == 2
    assert jitopt.counters["kernels"]["cpp_float_linear"] == 3


def test_more_than_128_static_rows_stay_on_onednn():
    got, want = _run(_mlp(), torch.randn(129, 64))
    assert_same(got, want, atol=1e-5, rtol=1e-5)
    assert jitopt.counters["passes"]["pack_linear_weight_blocks"] == 0
    assert jitopt.counters["passes"]["prepack_linear_weights"] == 3


def test_symbolic_rows_are_taken():
    model = _mlp()
    fast = torch.compile(model, backend="jitopt", dynamic=True)
    with torch.no_grad():
        for rows in (3, 200):
            x = torch.randn(rows, 64)
            assert_same(fast(x), model(x), atol=1e-5, rtol=1e-5)
    assert jitopt.counters["passes"]["pack_linear_weight_blocks"] == 3


def test_only_with_the_cpp_target():
    got, want = _run(_mlp(), torch.randn(4, 64), targets=["aten"])
    assert_same(got, want, atol=1e-5, rtol=1e-5)
    assert jitopt.counters["passes"]["pack_linear_weight_blocks"] == 0


def test_graphs_over_the_same_weights_share_one_packed_copy():
    prepack = importlib.import_module("jitopt.passes.prepack_linear_weights")
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    fast = torch.compile(model, backend="jitopt")
    with torch.no_grad():
        for rows in (3, 1, 7):  # static 3, then 1 (specialized), then a symbolic batch
            x = torch.randn(rows, 16)
            assert_same(fast(x), model(x), atol=1e-5)
    assert jitopt.counters["graphs"]["compiled_inference"] >= 2
    owner, views = prepack._PACKED[id(model[0].weight)]
    assert owner() is model[0].weight and len(views) == 1


def test_an_updated_weight_is_packed_again():
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        first = torch.compile(model, backend="jitopt")(x)
        model[0].weight.mul_(2)
        torch._dynamo.reset()
        assert_same(torch.compile(model, backend="jitopt")(x), model(x), atol=1e-5)
    assert not torch.allclose(first, model(x))


@pytest.mark.parametrize("rows,blocked", [((200, 1), 0), ((1, 200), 6)])
def test_a_weight_keeps_the_packing_its_first_graph_chose(rows, blocked):
    """A long prompt's prefill (over 128 rows: oneDNN), then decode steps of 1 row over the
    same weights, or the other way round: one packed copy, the first graph's."""
    prepack = importlib.import_module("jitopt.passes.prepack_linear_weights")
    model = _mlp()
    fast = torch.compile(model, backend="jitopt")
    with torch.no_grad():
        for n in rows:
            x = torch.randn(n, 64)
            assert_same(fast(x), model(x), atol=1e-5, rtol=1e-5)
    assert jitopt.counters["passes"]["pack_linear_weight_blocks"] == blocked
    _, views = prepack._PACKED[id(model[0].weight)]
    assert len(views) == 1


def test_empty_layers_match_eager():
    for layer in (nn.Linear(0, 8), nn.Linear(8, 0)):
        got, want = _run(nn.Sequential(layer).eval(), torch.randn(3, layer.in_features))
        assert_same(got, want)


def test_a_broadcast_bias_stays_on_aten():
    """Regression: addmm broadcasts a [1] bias, which the kernel read as [N] (past its end)."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(16, 70))
            self.bias = nn.Parameter(torch.randn(1))

        def forward(self, x):
            return torch.addmm(self.bias, x, self.weight)

    got, want = _run(Model().eval(), torch.randn(5, 16))
    assert_same(got, want, atol=1e-5, rtol=1e-5)
    assert jitopt.counters["passes"]["pack_linear_weight_blocks"] == 0
