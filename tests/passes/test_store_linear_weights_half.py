"""quantize="bf16" / "fp16": linears over frozen weights to oneDNN bfloat16 compute where it
measures faster, or to half-precision weights with float32 activations and arithmetic;
checked against the same rounding done eagerly and against fp32."""

import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import jitopt
import jitopt.passes  # noqa: F401  (loads the pass modules)

AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
ONEDNN_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
PASS = sys.modules["jitopt.passes.store_linear_weights_half"]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 200), nn.GELU(), nn.Linear(200, 32, bias=False)).eval()


def _eager_half_weights(model, dtype, x, round_inputs=False):
    """The oracle: the same model with its weights (and, for bf16 compute, each linear's
    input) rounded to `dtype`, run in float64."""
    with torch.no_grad():
        h = x.double()
        for layer in model:
            if isinstance(layer, nn.Linear):
                h = h.to(dtype).double() if round_inputs else h
                h = h @ layer.weight.to(dtype).double().t()
                h = h if layer.bias is None else h + layer.bias.double()
            else:
                h = layer(h)
        return h.float()


@pytest.mark.skipif(not ONEDNN_BF16, reason="oneDNN has no bfloat16 support on this CPU")
@pytest.mark.parametrize("shape", [(16, 64), (3, 7, 64)])
def test_bf16_computes_on_onednn_where_faster(shape, monkeypatch):
    monkeypatch.setattr(PASS, "bf16_linear_faster", lambda rows, n, k: True)
    model, x = _mlp(), torch.randn(*shape)
    with torch.no_grad():
        got = torch.compile(model, backend="jitopt", options={"quantize": "bf16"})(x)
        assert jitopt.counters["passes"]["store_linear_weights_bf16"] == 2
        report = jitopt.explain(model, x, quantize="bf16")
    layers = report.graphs[0].aten[0].quantized_layers
    assert [q["mode"] for q in layers] == ["bf16 (oneDNN)"] * 2
    # bf16 products (8-bit mantissas) summed in float32: close to the same rounding done in
    # float64, and to fp32.
    want = _eager_half_weights(model, torch.bfloat16, x, round_inputs=True)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert F.cosine_similarity(got.flatten(), model(x).flatten(), 0) > 0.9999


@pytest.mark.skipif(not AVX512, reason="the half-weight kernel is written for AVX-512")
def test_bf16_decoding_reads_bf16_weights_in_float32_arithmetic():
    model, x = _mlp(), torch.randn(2, 64)  # a decode step's few rows: memory-bound
    with torch.no_grad():
        report = jitopt.explain(model, x, quantize="bf16")
    layers = report.graphs[0].aten[0].quantized_layers
    assert [q["mode"] for q in layers] == ["bf16 (weights only)"] * 2


@pytest.mark.skipif(not ONEDNN_BF16, reason="oneDNN has no bfloat16 support on this CPU")
def test_bf16_keeps_fp32_where_fp32_measures_faster(monkeypatch):
    monkeypatch.setattr(PASS, "bf16_linear_faster", lambda rows, n, k: False)
    model, x = _mlp(), torch.randn(12, 64)
    with torch.no_grad():
        report = jitopt.explain(model, x, quantize="bf16")
    layers = report.graphs[0].aten[0].quantized_layers
    assert [q["mode"] for q in layers] == ["fp32 (kept)"] * 2
    assert "fp32 linear measured faster" in layers[0]["reason"]


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 64)])
def test_half_weights_match_the_same_rounding_done_eagerly(mode, shape, monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    model, x = _mlp(), torch.randn(*shape)
    with torch.no_grad():
        got = torch.compile(model, backend="jitopt", options={"quantize": mode})(x)
        fp32 = model(x)
    name = {"bf16": "store_linear_weights_bf16", "fp16": "store_linear_weights_fp16"}[mode]
    assert jitopt.counters["passes"][name] == 2
    assert jitopt.counters["kernels"]["cpp_quantized_linear"] == (2 if AVX512 else 0)
    torch.testing.assert_close(got, _eager_half_weights(model, HALF[mode], x), atol=2e-5,
                               rtol=1e-5)
    assert F.cosine_similarity(got.flatten(), fp32.flatten(), 0) > 0.99999


def test_many_rows_keep_fp32_and_explain_says_why():
    model, x = _mlp(), torch.randn(300, 64)
    with torch.no_grad():
        report = jitopt.explain(model, x, quantize="fp16")
        got = torch.compile(model, backend="jitopt", options={"quantize": "fp16"})(x)
    layers = report.graphs[0].aten[0].quantized_layers
    assert [q["mode"] for q in layers] == ["fp32 (kept)"] * 2
    assert "300 rows" in layers[0]["reason"]
    torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)


def test_fp16_keeps_a_layer_whose_weights_overflow_it():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = 1e5
        report = jitopt.explain(model, torch.randn(2, 64), quantize="fp16")
    layers = report.graphs[0].aten[0].quantized_layers
    assert layers[0]["mode"] == "fp32 (kept)" and "float16's range" in layers[0]["reason"]
    assert layers[1]["mode"] == "fp16 (weights only)" and layers[1]["weight_sqnr_db"] > 60


@pytest.mark.skipif(not ONEDNN_BF16, reason="oneDNN has no bfloat16 support on this CPU")
def test_bf16_choice_is_timed_once_per_shape():
    PASS._BF16_FASTER.pop((40, 48, 56), None)
    first = PASS.bf16_linear_faster(40, 48, 56)
    assert isinstance(first, bool) and PASS._BF16_FASTER[(40, 48, 56)] is first
    assert PASS.bf16_linear_faster(40, 48, 56) is first  # cached, not re-timed
