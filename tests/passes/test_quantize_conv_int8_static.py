"""quantize="int8-static": calibrated convolutions to uint8 x int8 oneDNN convolutions,
checked against the eager reference quantizer and against fp32."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference_quantizer import quantize_int8_static_reference

import jitopt

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="int8-static runs on oneDNN, absent from this build")


class Block(nn.Module):
    """conv-BN-ReLU, conv-BN, a residual add and ReLU: the ResNet pattern."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.skip = nn.Conv2d(3, 16, 1)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


def _block():
    torch.manual_seed(0)
    model = Block().eval()
    with torch.no_grad():  # non-trivial statistics, so the BN folds are exercised
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model


def _compiled(model, x, **options):
    with torch.no_grad():
        return torch.compile(model, backend="jitopt",
                             options={"quantize": "int8-static", **options})(x)


def test_matches_the_reference_quantizer_and_stays_close_to_fp32():
    model, x = _block(), torch.randn(2, 3, 12, 12)
    calibration = jitopt.calibrate(model, [torch.randn(2, 3, 12, 12) for _ in range(4)])
    got = _compiled(model, x)
    with torch.no_grad():
        reference = quantize_int8_static_reference(model, calibration.ranges)(x)
        fp32 = model(x)
    assert jitopt.counters["passes"]["quantize_conv_int8_static"] == 3
    assert jitopt.counters["passes"]["prepack_convolutions"] == 0  # none left in fp32
    # The same rounded operands as the oracle: only where a value sits on a rounding tie
    # after BN folding (or float32 summation order) can they differ, by one step.
    torch.testing.assert_close(got, reference, atol=2e-3, rtol=1e-3)
    assert F.cosine_similarity(got.flatten(), fp32.flatten(), 0) > 0.999


def test_inputs_outside_the_calibrated_range_are_clipped_like_the_reference():
    model, x = _block(), torch.randn(2, 3, 12, 12)
    calibration = jitopt.calibrate(model, [0.1 * x])  # a range ten times too narrow
    got = _compiled(model, x)
    with torch.no_grad():
        reference = quantize_int8_static_reference(model, calibration.ranges)(x)
    torch.testing.assert_close(got, reference, atol=2e-3, rtol=1e-3)
    with torch.no_grad():
        assert F.cosine_similarity(got.flatten(), model(x).flatten(), 0) < 0.99


def test_without_calibration_convolutions_stay_fp32_with_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()  # never calibrated
    x = torch.randn(1, 3, 10, 10)
    with pytest.warns(jitopt.JitoptFallbackWarning, match="jitopt.calibrate"):
        got = _compiled(model, x, on_error="warn")
    with torch.no_grad():
        torch.testing.assert_close(got, model(x))
    assert jitopt.counters["passes"]["quantize_conv_int8_static"] == 0


def test_explain_reports_ranges_sqnr_and_the_fused_relu():
    model, x = _block(), torch.randn(2, 3, 12, 12)
    jitopt.calibrate(model, [x])
    with torch.no_grad():
        report = jitopt.explain(model, x, quantize="int8-static")
    graph = report.graphs[0].aten[0]
    layers = {q["layer"]: q for q in graph.quantized_layers}
    assert len(layers) == 3 and all(q["mode"] == "int8-static" for q in layers.values())
    assert all(q["weight_sqnr_db"] > 40 and q["output_sqnr_db"] > 30 for q in layers.values())
    assert sorted(q["fused"] or "" for q in layers.values()) == ["", "", "relu"]
    lo, hi = layers["convolution"]["input_range"]
    assert lo == pytest.approx(x.min().item(), rel=1e-5)
    assert hi == pytest.approx(x.max().item(), rel=1e-5)
    assert graph.quantization_error["cosine"] > 0.999
    assert "input range [" in str(report)


def test_a_budget_keeps_the_layers_below_it_in_fp32():
    model, x = _block(), torch.randn(2, 3, 12, 12)
    jitopt.calibrate(model, [x])
    with torch.no_grad():
        report = jitopt.explain(model, x, quantize="int8-static", quantize_min_sqnr_db=100)
    layers = report.graphs[0].aten[0].quantized_layers
    assert [q["mode"] for q in layers] == ["fp32 (kept)"] * 3
    assert all("below the budget" in q["reason"] for q in layers)
