"""Whole torch.nn models compiled with jitopt, compared with eager PyTorch (inference)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
from comparisons import assert_same

import jitopt


def compiled_matches_eager(model, *args, **kwargs):
    """Run `model` eagerly and compiled with jitopt under no_grad; return both outputs."""
    with torch.no_grad():
        expected = model(*args, **kwargs)
        actual = torch.compile(model, backend="jitopt")(*args, **kwargs)
    assert_same(actual, expected)
    return actual, expected


def assert_compiled_something():
    """The backend ran (not a Dynamo graph break down to nothing) and nothing fell back."""
    assert jitopt.counters["graphs"]["captured"] >= 1
    assert jitopt.counters["graphs"]["compiled_inference"] >= 1
    assert sum(jitopt.counters["fallbacks"].values()) == 0


@contextlib.contextmanager
def mha_fastpath(enabled: bool):
    old = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(old)


# --------------------------------------------------------------------------------------------
# MLP


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(16, 64), nn.GELU(), nn.Dropout(0.2),
            nn.Linear(64, 32), nn.ReLU(), nn.LayerNorm(32),
            nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x).softmax(-1)


def test_mlp():
    model = MLP().eval()
    compiled_matches_eager(model, torch.randn(8, 16))
    assert_compiled_something()


def test_mlp_3d_input():
    model = MLP().eval()
    compiled_matches_eager(model, torch.randn(2, 5, 16))
    assert_compiled_something()


# --------------------------------------------------------------------------------------------
# CNN: Conv2d + BatchNorm2d + ReLU (eval), BN folds into the conv


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


def make_cnn() -> SmallCNN:
    """A CNN whose BatchNorms hold non-trivial running statistics and affine parameters, so a
    wrong fold would show in the numbers."""
    model = SmallCNN()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def test_cnn_conv_bn_relu_eval():
    model = make_cnn()
    compiled_matches_eager(model, torch.randn(2, 3, 16, 16))
    assert_compiled_something()
    assert jitopt.counters["passes"]["fold_conv_bn"] >= 1


def test_cnn_for_inference():
    model = make_cnn()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    served = jitopt.for_inference(model)
    assert isinstance(served, nn.Module)
    actual = served(x)
    assert_same(actual, expected)
    assert_compiled_something()
    assert jitopt.counters["passes"]["fold_conv_bn"] >= 1
    # The original is left in eval mode with its parameters trainable and shared.
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())
    # A second call with another batch gives eager's answer too.
    x2 = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected2 = model(x2)
    assert_same(served(x2), expected2)


def test_cnn_for_inference_from_training_mode():
    """for_inference switches a model still in training mode to eval (BN uses running stats)."""
    model = make_cnn().train()
    x = torch.randn(2, 3, 16, 16)
    served = jitopt.for_inference(model)
    actual = served(x)
    with torch.no_grad():
        expected = model.eval()(x)
    assert_same(actual, expected)
    assert jitopt.counters["passes"]["fold_conv_bn"] >= 1


def test_cnn_for_inference_sees_weight_updates():
    """Weights frozen into the compiled CNN are guarded: an in-place update of the original's
    conv weight or BN statistics (an optimizer step, load_state_dict) gives eager's new answer,
    never the stale folded one."""
    model = make_cnn()
    served = jitopt.for_inference(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    assert_same(served(x), expected)

    with torch.no_grad():
        model.features[0].weight.mul_(1.5)
        model.features[4].running_var.mul_(3.0)
        expected_after = model(x)
    assert not torch.allclose(expected_after, expected)
    assert_same(served(x), expected_after)

    state = {k: v.clone() for k, v in make_cnn().state_dict().items()}
    for v in state.values():
        if v.is_floating_point():
            v.add_(0.1)
    model.load_state_dict(state)
    with torch.no_grad():
        expected_loaded = model(x)
    assert_same(served(x), expected_loaded)
    assert sum(jitopt.counters["fallbacks"].values()) == 0


# --------------------------------------------------------------------------------------------
# @jitopt.optimize


def test_optimize_plain_function():
    w = torch.randn(16, 8)

    def fn(x, y):
        return torch.tanh(x @ w) * y.sigmoid() + (x.sum(-1, keepdim=True) / 3)

    optimized = jitopt.optimize(fn)
    assert optimized.__name__ == "fn"
    x, y = torch.randn(4, 16), torch.randn(4, 8)
    expected = fn(x, y)
    assert_same(optimized(x, y), expected)
    assert jitopt.counters["graphs"]["captured"] >= 1
    assert sum(jitopt.counters["fallbacks"].values()) == 0


def test_optimize_decorator_syntax():
    @jitopt.optimize
    def gelu_mlp(x, w1, w2):
        return torch.nn.functional.gelu(x @ w1) @ w2

    x, w1, w2 = torch.randn(3, 8), torch.randn(8, 32), torch.randn(32, 4)
    expected = torch.nn.functional.gelu(x @ w1) @ w2
    assert_same(gelu_mlp(x, w1, w2), expected)
    assert jitopt.counters["graphs"]["captured"] >= 1


def test_optimize_decorator_with_options():
    @jitopt.optimize(on_error="raise")
    def fn(x):
        return (x * 2).relu().cumsum(0)

    x = torch.randn(6, 5)
    assert_same(fn(x), (x * 2).relu().cumsum(0))
    assert jitopt.counters["graphs"]["captured"] >= 1


def test_optimize_module():
    model = MLP().eval()
    optimized = jitopt.optimize(model)
    assert isinstance(optimized, nn.Module)
    x = torch.randn(8, 16)
    with torch.no_grad():
        expected = model(x)
    assert_same(optimized(x), expected)
    assert_compiled_something()


def test_optimize_cnn_module_folds_bn():
    model = make_cnn()
    optimized = jitopt.optimize(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    assert_same(optimized(x), expected)
    assert_compiled_something()


# --------------------------------------------------------------------------------------------
# nn.TransformerEncoder


def make_encoder() -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.1,
                                       batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2).eval()


def padding_mask() -> torch.Tensor:
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 5:] = True
    mask[2, 3:] = True
    return mask


def test_transformer_encoder():
    model = make_encoder()
    compiled_matches_eager(model, torch.randn(3, 7, 32))
    assert_compiled_something()


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("fastpath", [True, False], ids=["eager_fastpath", "eager_slowpath"])
def test_transformer_encoder_padding_mask(fastpath):
    """In eval under no_grad, eager PyTorch takes its fused "fast path" and, with a padding
    mask, runs on nested tensors that leave padded positions as zeros; compiled code (any
    Dynamo backend) takes the reference path, whose padded rows hold ordinary values. So with
    the fast path on only the unpadded positions are compared (the padded ones are undefined
    by PyTorch's contract); with the fast path off the whole output must match."""
    model = make_encoder()
    x = torch.randn(3, 7, 32)
    mask = padding_mask()
    with mha_fastpath(fastpath), torch.no_grad():
        expected = model(x, src_key_padding_mask=mask)
        actual = torch.compile(model, backend="jitopt")(x, src_key_padding_mask=mask)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if fastpath:
        assert_same(actual[~mask], expected[~mask])
    else:
        assert_same(actual, expected)
    assert_compiled_something()


def test_transformer_encoder_causal_mask():
    # is_causal=True is passed alongside the mask: without it TransformerEncoder inspects the
    # mask's values (`bool((mask == causal).all())`), a data-dependent graph break in Dynamo
    # that leaves jitopt nothing to compile.
    model = make_encoder()
    x = torch.randn(2, 6, 32)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    compiled_matches_eager(model, x, mask=causal, is_causal=True)
    assert_compiled_something()


def test_transformer_encoder_float_mask_and_padding_mask():
    model = make_encoder()
    x = torch.randn(3, 7, 32)
    # Both masks boolean: mixing a float attn mask with a bool padding mask makes PyTorch warn
    # (deprecated), and the warning is a graph break.
    attn_mask = torch.rand(7, 7) < 0.3
    attn_mask.fill_diagonal_(False)  # True = may not attend; every query keeps itself
    mask = padding_mask()
    with mha_fastpath(False), torch.no_grad():
        expected = model(x, mask=attn_mask, src_key_padding_mask=mask, is_causal=False)
        actual = torch.compile(model, backend="jitopt")(x, mask=attn_mask,
                                                        src_key_padding_mask=mask,
                                                        is_causal=False)
    assert_same(actual, expected)
    assert_compiled_something()


# --------------------------------------------------------------------------------------------
# nn.MultiheadAttention


class SelfAttention(nn.Module):
    def __init__(self, need_weights: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x, attn_mask=None):
        return self.attn(x, x, x, attn_mask=attn_mask, need_weights=self.need_weights)


class CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, kdim=24, vdim=16, batch_first=True)

    def forward(self, q, k, v, key_padding_mask):
        return self.attn(q, k, v, key_padding_mask=key_padding_mask, need_weights=True,
                         average_attn_weights=False)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_multihead_attention(need_weights, mask_kind):
    model = SelfAttention(need_weights).eval()
    x = torch.randn(2, 6, 32)
    if mask_kind == "none":
        mask = None
    elif mask_kind == "bool":
        mask = torch.ones(6, 6, dtype=torch.bool).triu(1)  # True = not allowed to attend
    else:
        mask = torch.randn(6, 6)
    actual, expected = compiled_matches_eager(model, x, mask)
    assert isinstance(actual, tuple) and len(actual) == 2
    if need_weights:
        assert actual[1].shape == (2, 6, 6)
    else:
        assert actual[1] is None
    assert_compiled_something()


def test_multihead_attention_cross_with_key_padding_mask():
    model = CrossAttention().eval()
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 7, 24), torch.randn(2, 7, 16)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 4:] = True
    actual, _ = compiled_matches_eager(model, q, k, v, kpm)
    assert actual[1].shape == (2, 4, 5, 7)
    assert_compiled_something()


# --------------------------------------------------------------------------------------------
# nn.LSTM


class LSTMModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size=12, hidden_size=20, num_layers=2, batch_first=True)

    def forward(self, x, state=None):
        output, (h, c) = self.lstm(x, state)
        return output, (h, c)


# Dynamo does not trace RNN modules unless torch._dynamo.config.allow_rnn is set: without it
# nn.LSTM runs eagerly inside the compiled model. Both ways must give eager's answer; with
# allow_rnn the LSTM is in the graph jitopt compiles.


@pytest.mark.parametrize("allow_rnn", [False, True], ids=["rnn_eager", "rnn_traced"])
def test_lstm(allow_rnn):
    model = LSTMModel().eval()
    x = torch.randn(3, 9, 12)
    with torch._dynamo.config.patch(allow_rnn=allow_rnn):
        actual, expected = compiled_matches_eager(model, x)
    output, (h, c) = actual
    assert output.shape == (3, 9, 20) and h.shape == (2, 3, 20) and c.shape == (2, 3, 20)
    if allow_rnn:
        assert_compiled_something()


@pytest.mark.parametrize("allow_rnn", [False, True], ids=["rnn_eager", "rnn_traced"])
def test_lstm_with_initial_state(allow_rnn):
    model = LSTMModel().eval()
    x = torch.randn(3, 9, 12)
    state = (torch.randn(2, 3, 20), torch.randn(2, 3, 20))
    with torch._dynamo.config.patch(allow_rnn=allow_rnn):
        compiled_matches_eager(model, x, state)
    if allow_rnn:
        assert_compiled_something()


class LSTMClassifier(nn.Module):
    """LSTM between other layers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 12)
        self.lstm = nn.LSTM(input_size=12, hidden_size=20, num_layers=2, batch_first=True)
        self.head = nn.Linear(20, 4)

    def forward(self, x):
        output, (h, c) = self.lstm(torch.relu(self.embed(x)))
        return self.head(output[:, -1]).log_softmax(-1), (h, c)


@pytest.mark.parametrize("allow_rnn", [False, True], ids=["rnn_eager", "rnn_traced"])
def test_lstm_inside_model(allow_rnn):
    model = LSTMClassifier().eval()
    with torch._dynamo.config.patch(allow_rnn=allow_rnn):
        compiled_matches_eager(model, torch.randn(3, 9, 6))
    if allow_rnn:
        assert_compiled_something()
