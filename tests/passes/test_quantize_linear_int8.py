"""quantize="int8": linears over frozen weights to per-token x per-channel int8 products,
checked against the eager reference quantizer and against fp32."""

import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference_quantizer import quantize_int8_reference

import jitopt


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 32, bias=False)).eval()


def _compile_int8(model, x):
    with torch.no_grad():
        return torch.compile(model, backend="jitopt", options={"quantize": "int8"})(x)


@pytest.mark.parametrize("shape", [(16, 64), (2, 7, 64)])
def test_matches_the_reference_quantizer_and_stays_close_to_fp32(shape):
    model, x = _mlp(), torch.randn(*shape) * 2
    got = _compile_int8(model, x)
    with torch.no_grad():
        reference, fp32 = quantize_int8_reference(model, x)(x), model(x)
    assert jitopt.counters["passes"]["quantize_linear_int8"] == 2
    # Same quantization as the oracle: only float rounding order differs.
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-4)
    assert F.cosine_similarity(got.flatten(), fp32.flatten(), 0) > 0.999


def test_explain_reports_each_layer_and_its_weight_sqnr():
    model, x = _mlp(), torch.randn(8, 64)
    with torch.no_grad():
        report = jitopt.explain(model, x, quantize="int8")
    layers = report.graphs[0].aten[0].quantized_layers
    assert [q["shape"] for q in layers] == [[256, 64], [32, 256]]
    assert all(q["mode"] == "int8" and 35 < q["weight_sqnr_db"] < 60 for q in layers)
    assert "weight SQNR" in str(report)


def test_smoothing_moves_outlier_channels_into_the_weight():
    model, x = _mlp(), torch.randn(32, 64)
    x[:, 5] *= 60  # one outlier channel, as LayerNorm outputs of trained transformers have
    got = _compile_int8(model, x)
    with torch.no_grad():
        smoothed, plain, fp32 = (quantize_int8_reference(model, x)(x),
                                 quantize_int8_reference(model)(x), model(x))
    torch.testing.assert_close(got, smoothed, atol=1e-4, rtol=1e-4)

    def error(y):
        return ((y - fp32).norm() / fp32.norm()).item()
    assert error(got) < 0.5 * error(plain)
    with torch.no_grad():
        report = jitopt.explain(model, x, quantize="int8")
    layers = report.graphs[0].aten[0].quantized_layers
    assert all(q["smoothing"] == "SmoothQuant alpha=0.5" for q in layers)


def test_channels_the_examples_left_at_zero_are_not_amplified():
    """Regression: a ReLU output channel that was zero on every example got a SmoothQuant
    scale of 1e-4, so x was multiplied by 1e4 there; the first input that used the channel
    had that one value set its row's int8 scale and every other channel rounded to zero (a
    0.7 error on outputs of about 0.5)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 80), nn.ReLU(), nn.Linear(80, 40, bias=False)).eval()
    examples, later = torch.randn(3, 96), torch.randn(20, 96)
    compiled = torch.compile(model, backend="jitopt", options={"quantize": "int8"})
    with torch.no_grad():
        assert (torch.relu(model[0](examples)) == 0).all(0).sum() > 0  # dead on the examples
        compiled(examples)
        got, fp32 = compiled(later[:3]), model(later[:3])
    assert F.cosine_similarity(got.flatten(), fp32.flatten(), 0) > 0.999


def test_all_zero_rows_stay_zero():
    model, x = _mlp(), torch.randn(4, 64)
    x[1] = 0
    got = _compile_int8(model, x)
    with torch.no_grad():
        want = quantize_int8_reference(model, x)(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_off_by_default_and_in_training():
    model, x = _mlp(), torch.randn(4, 64)
    with torch.no_grad():
        torch.compile(model, backend="jitopt")(x)
    assert jitopt.counters["passes"]["quantize_linear_int8"] == 0
    torch._dynamo.reset()
    x.requires_grad_()
    out = torch.compile(model, backend="jitopt", options={"quantize": "int8"})(x)
    out.sum().backward()
    assert jitopt.counters["passes"]["quantize_linear_int8"] == 0
    assert x.grad is not None


def test_an_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="valid choices are .*'int8-static'"):
        jitopt.Config.from_options({"quantize": "int9"})


@pytest.mark.parametrize("kernel", ["int_mm NK", "int_mm KN", "onednn"])
def test_every_int8_kernel_gives_the_same_answer(kernel, monkeypatch):
    module = importlib.import_module("jitopt.passes.quantize_linear_int8")
    monkeypatch.setattr(module, "fastest_int8_kernel", lambda rows, n, k: kernel)
    model, x = _mlp(), torch.randn(16, 64)
    got = _compile_int8(model, x)
    with torch.no_grad():
        torch.testing.assert_close(got, quantize_int8_reference(model, x)(x), atol=1e-4,
                                   rtol=1e-4)
    with torch.no_grad():
        report = jitopt.explain(model, x, quantize="int8")
    assert {q["kernel"] for q in report.graphs[0].aten[0].quantized_layers} == {kernel}


def test_the_kernel_is_chosen_by_timing_once_per_shape():
    module = importlib.import_module("jitopt.passes.quantize_linear_int8")
    choice = module.fastest_int8_kernel(8, 48, 64)
    assert choice in ("int_mm NK", "int_mm KN", "onednn")
    assert module.fastest_int8_kernel(8, 48, 64) == choice  # cached: no second timing
    assert module.fastest_int8_kernel("symbolic rows", 48, 64) == "int_mm NK"


def test_a_kernel_that_fails_at_the_shape_is_not_chosen(monkeypatch):
    module = importlib.import_module("jitopt.passes.quantize_linear_int8")
    monkeypatch.setattr(module, "_KERNELS", {})
    def failing():
        raise RuntimeError("unsupported at this shape")

    monkeypatch.setattr(module, "_onednn_int8_product", lambda x, w: failing)
    assert module.fastest_int8_kernel(8, 48, 64).startswith("int_mm")
