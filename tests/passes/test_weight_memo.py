"""Quantized weights are prepared once per weight and shared by every graph compiled over it."""

import gc

import torch
import torch.nn as nn

import jitopt
from jitopt.passes import weight_memo
from jitopt.passes.weight_memo import per_weight


def test_one_result_per_weight_version_and_params():
    weight, calls = torch.randn(8, 4), []

    def compute():
        calls.append(1)
        return weight.sum().item()

    first = per_weight("test", weight, compute, 64)
    assert per_weight("test", weight.t().t(), compute, 64) == first and len(calls) == 1
    per_weight("test", weight, compute, 32)  # other parameters: another entry
    assert len(calls) == 2
    with torch.no_grad():
        weight.mul_(2)  # changed in place: a new version, computed afresh
    assert per_weight("test", weight, compute, 64) == 2 * first and len(calls) == 3


def test_entries_go_with_their_weight():
    weight, others = torch.randn(8, 4), set(weight_memo._MEMO)
    per_weight("test", weight, lambda: 1)
    mine = set(weight_memo._MEMO) - others
    assert len(mine) == 1
    del weight
    gc.collect()  # (may free other tests' weights too: only this one's entry is checked)
    assert mine.isdisjoint(weight_memo._MEMO)


def test_graphs_over_the_same_weights_prepare_each_weight_once(monkeypatch):
    import importlib

    module = importlib.import_module("jitopt.passes.quantize_linear_int8_weight_only")
    prepared, calls = module._prepared, []
    monkeypatch.setattr(module, "_prepared", lambda w: calls.append(w.shape) or prepared(w))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval()
    compiled = torch.compile(model, backend="jitopt", dynamic=False,
                             options={"quantize": "int8-weight-only"})
    with torch.no_grad():
        for rows in (2, 5):  # two static shapes: two graphs
            x = torch.randn(rows, 64)
            torch.testing.assert_close(compiled(x), model(x), atol=0.05, rtol=0.05)
    assert jitopt.counters["graphs"]["compiled_inference"] == 2
    assert sorted(calls) == [(64, 128), (128, 64)]  # [N, K] per linear, once each
