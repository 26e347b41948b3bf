"""Frozen weights are constants in the compiled graph; changing them must never go unseen."""

import torch
import torch.nn as nn
from comparisons import assert_same

import jitopt
from jitopt.compiler import MAX_FROZEN_VARIANTS


def _model():
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()


def test_in_place_weight_update_recompiles():
    model = _model()
    fast = torch.compile(model, backend="jitopt")
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert_same(fast(x), model(x))
        assert jitopt.counters["passes"]["fold_linear_bn"] == 1
        model[0].weight.mul_(2)  # e.g. an optimizer step
        model[1].running_var.fill_(4.0)
        assert_same(fast(x), model(x))
    assert jitopt.counters["graphs"]["recompiled_for_weights"] == 1


def test_load_state_dict_is_seen():
    model, other = _model(), _model()
    fast = torch.compile(model, backend="jitopt")
    x = torch.randn(5, 4)
    with torch.no_grad():
        fast(x)
        model.load_state_dict(other.state_dict())
        assert_same(fast(x), other(x))


def test_modules_sharing_one_graph_each_get_their_own_weights():
    layers = [_model() for _ in range(MAX_FROZEN_VARIANTS + 3)]
    compiled = [torch.compile(m, backend="jitopt") for m in layers]
    x = torch.randn(2, 4)
    with torch.no_grad():
        for _ in range(2):  # alternate, as layers of one model do
            for m, fast in zip(layers, compiled):
                assert_same(fast(x), m(x))
    assert jitopt.counters["graphs"]["captured"] == 1, "one graph serves every instance"
    assert jitopt.counters["graphs"]["recompiled_for_weights"] >= MAX_FROZEN_VARIANTS


def test_for_inference_tracks_the_original_module():
    model = _model()
    served = jitopt.for_inference(model)
    x = torch.randn(5, 4)
    with torch.no_grad():
        expected = model(x)
    assert not model.training
    assert_same(served(x), expected)
    with torch.no_grad():
        model[3].bias.add_(1.0)
        assert_same(served(x), model(x))
    assert served.original is model
