"""quantize="int8-weight-only": linears over frozen weights to int8 weights with float
activations, checked against the eager reference quantizer and against fp32."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference_quantizer import quantize_int8_weight_only_reference

import jitopt

AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 200), nn.GELU(), nn.Linear(200, 32, bias=False)).eval()


def _compile(model, x, **options):
    with torch.no_grad():
        return torch.compile(model, backend="jitopt",
                             options={"quantize": "int8-weight-only", **options})(x)


@pytest.mark.parametrize("shape", [(1, 64), (16, 64), (2, 7, 64)])
def test_matches_the_reference_quantizer_and_stays_close_to_fp32(shape):
    model, x = _mlp(), torch.randn(*shape)
    got = _compile(model, x)
    with torch.no_grad():
        reference, fp32 = quantize_int8_weight_only_reference(model)(x), model(x)
    assert jitopt.counters["passes"]["quantize_linear_int8_weight_only"] == 2
    assert jitopt.counters["kernels"]["cpp_quantized_linear"] == (2 if AVX512 else 0)
    # The same int8 weights as the oracle: only the float32 summation order differs.
    torch.testing.assert_close(got, reference, atol=2e-5, rtol=1e-5)
    assert F.cosine_similarity(got.flatten(), fp32.flatten(), 0) > 0.9999


def test_explain_reports_each_layer_its_sqnr_and_the_int8_bytes():
    model, x = _mlp(), torch.randn(8, 64)
    with torch.no_grad():
        report = jitopt.explain(model, x, quantize="int8-weight-only")
    graph = report.graphs[0].aten[0]
    layers = graph.quantized_layers
    assert [q["shape"] for q in layers] == [[200, 64], [32, 200]]
    assert all(q["mode"] == "int8-weight-only" and 40 < q["weight_sqnr_db"] < 60
               and q["output_sqnr_db"] > 40 for q in layers)
    assert graph.quantization_error["cosine"] > 0.9999
    # The int8 weights (output channels padded to blocks of 64) and no fp32 copy of them.
    assert graph.constant_bytes["int8"] == 4 * 64 * 64 + 64 * 200
    assert graph.constant_bytes["float32"] == 4 * (200 + 200 + 32)  # scales and the bias


def test_a_budget_keeps_the_layers_below_it_in_fp32():
    model, x = _mlp(), torch.randn(8, 64)
    with torch.no_grad():
        report = jitopt.explain(model, x, quantize="int8-weight-only",
                                quantize_min_sqnr_db=100)
    layers = report.graphs[0].aten[0].quantized_layers
    assert [q["mode"] for q in layers] == ["fp32 (kept)"] * 2
    assert "below the budget of 100 dB" in layers[0]["reason"]


def test_symbolic_rows_compile_once():
    model = _mlp()
    compiled = torch.compile(model, backend="jitopt", dynamic=True,
                             options={"quantize": "int8-weight-only"})
    reference = quantize_int8_weight_only_reference(model)
    with torch.no_grad():
        for rows in (3, 9, 130):
            x = torch.randn(rows, 64)
            torch.testing.assert_close(compiled(x), reference(x), atol=2e-5, rtol=1e-5)
    assert jitopt.counters["graphs"]["compiled_inference"] == 1


def test_training_is_not_quantized():
    model, x = _mlp().train(), torch.randn(4, 64, requires_grad=True)
    got = torch.compile(model, backend="jitopt", options={"quantize": "int8-weight-only"})(x)
    torch.testing.assert_close(got, model(x))
    assert jitopt.counters["passes"]["quantize_linear_int8_weight_only"] == 0
