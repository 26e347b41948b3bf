"""quantize="int4-weight-only": linears over frozen weights to grouped 4-bit weights with
float activations, checked against the eager reference quantizer and against fp32."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference_quantizer import quantize_int4_weight_only_reference

import jitopt

AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(100, 200), nn.GELU(), nn.Linear(200, 32, bias=False)).eval()


def _compile(model, x, **options):
    with torch.no_grad():
        return torch.compile(model, backend="jitopt",
                             options={"quantize": "int4-weight-only", **options})(x)


@pytest.mark.parametrize("group_size", [None, 32, 7, 1000])
@pytest.mark.parametrize("shape", [(1, 100), (2, 7, 100)])
def test_matches_the_reference_quantizer_and_stays_close_to_fp32(shape, group_size):
    model, x = _mlp(), torch.randn(*shape)
    got = _compile(model, x, quantize_group_size=group_size)
    with torch.no_grad():
        reference = quantize_int4_weight_only_reference(model, group_size or 64)(x)
        fp32 = model(x)
    assert jitopt.counters["passes"]["quantize_linear_int4_weight_only"] == 2
    assert jitopt.counters["kernels"]["cpp_quantized_linear"] == (2 if AVX512 else 0)
    # The same 4-bit levels as the oracle: only float32 rounding differs.
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-4)
    # 16 levels per group: about 24 dB of weight SQNR, cosine 0.99 on random weights.
    assert F.cosine_similarity(got.flatten(), fp32.flatten(), 0) > 0.98


def test_explain_reports_the_group_size_and_sqnr():
    model, x = _mlp(), torch.randn(8, 100)
    with torch.no_grad():
        report = jitopt.explain(model, x, quantize="int4-weight-only", quantize_group_size=32)
    graph = report.graphs[0].aten[0]
    assert [q["mode"] for q in graph.quantized_layers] == ["int4-weight-only (groups of 32)"] * 2
    assert all(20 < q["weight_sqnr_db"] < 35 and q["output_sqnr_db"] > 18
               for q in graph.quantized_layers)
    assert "int4-weight-only (groups of 32)" in str(report)
    # Half a byte per (padded) weight; per group a float32 scale and offset.
    assert graph.constant_bytes["uint8"] == 4 * 100 * 32 + 200 * 32


def test_smaller_groups_are_more_accurate():
    model, x = _mlp(), torch.randn(8, 100)
    sqnr = {}
    for group_size in (16, 100):
        with torch.no_grad():
            report = jitopt.explain(model, x, quantize="int4-weight-only",
                                    quantize_group_size=group_size)
        sqnr[group_size] = report.graphs[0].aten[0].quantized_layers[0]["weight_sqnr_db"]
    assert sqnr[16] > sqnr[100] + 1


def test_group_size_is_checked():
    with pytest.raises(ValueError, match="positive integer"):
        jitopt.Config.from_options({"quantize": "int4-weight-only", "quantize_group_size": 0})
    with pytest.raises(ValueError, match="applies to quantize='int4-weight-only' only"):
        jitopt.Config.from_options({"quantize": "int8", "quantize_group_size": 32})
