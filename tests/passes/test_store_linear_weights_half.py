"""quantize="bf16" / "fp16": linears over frozen weights to half-precision weights with float32
activations and arithmetic, checked against the same rounding done eagerly and against fp32;
layers with many rows keep fp32."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import jitopt

AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 200), nn.GELU(), nn.Linear(200, 32, bias=False)).eval()


def _eager_half_weights(model, dtype, x):
    """The oracle: the same model with its weights rounded to `dtype`, run in float64."""
    with torch.no_grad():
        h = x.double()
        for layer in model:
            if isinstance(layer, nn.Linear):
                h = h @ layer.weight.to(dtype).double().t()
                h = h if layer.bias is None else h + layer.bias.double()
            else:
                h = layer(h)
        return h.float()


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 64)])
def test_matches_half_weights_done_eagerly_and_stays_close_to_fp32(mode, shape):
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
        report = jitopt.explain(model, x, quantize="bf16")
        got = torch.compile(model, backend="jitopt", options={"quantize": "bf16"})(x)
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
    assert layers[1]["mode"] == "fp16" and layers[1]["weight_sqnr_db"] > 60
