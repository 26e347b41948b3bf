"""A quantized compile measures what it changed on the example inputs: each layer's output
SQNR and the whole graph's error against fp32."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import jitopt


def _report(model, *inputs):
    with torch.no_grad():
        return jitopt.explain(model, *inputs, quantize="int8")


def test_layers_and_graph_are_measured_on_the_example_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).eval()
    x = torch.randn(16, 64)
    aten = _report(model, x).graphs[0].aten[0]
    with torch.no_grad():
        got = torch.compile(model, backend="jitopt", options={"quantize": "int8"})(x)
        want = model(x)
    error = aten.quantization_error
    assert error["outputs"] == 1
    assert math.isclose(error["cosine"], F.cosine_similarity(got.flatten(), want.flatten(), 0)
                        .item(), abs_tol=1e-6)
    assert math.isclose(error["max_abs_error"], (got - want).abs().max().item(), rel_tol=1e-3)
    for q in aten.quantized_layers:
        # Activations add their own rounding: the output is never cleaner than the weight.
        assert 20 < q["output_sqnr_db"] <= q["weight_sqnr_db"] + 3
    assert "output SQNR" in str(_report(model, x))


def test_first_layer_sqnr_matches_a_direct_computation():
    torch.manual_seed(0)
    linear = nn.Linear(32, 48).eval()
    x = torch.randn(8, 32)
    (q,) = _report(linear, x).graphs[0].aten[0].quantized_layers
    # SmoothQuant's scales from the example's channel maxima, then int8 both ways.
    smooth = (x.abs().amax(0).sqrt() / linear.weight.abs().amax(0).sqrt()).detach()
    weight, x_smoothed = linear.weight * smooth, x / smooth
    w_scale = weight.abs().amax(1) / 127
    wq = torch.round(weight / w_scale[:, None])
    x_scale = x_smoothed.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(x_smoothed / x_scale)
    with torch.no_grad():
        approx = (xq @ wq.t()) * x_scale * w_scale + linear.bias
        exact = linear(x)
    sqnr = 10 * math.log10(exact.pow(2).sum() / (exact - approx).pow(2).sum())
    assert math.isclose(q["output_sqnr_db"], sqnr, abs_tol=0.05)


def test_not_measured_where_running_would_write_the_inputs():
    class Accumulate(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(16, 16)

        def forward(self, x, total):
            total.add_(1)
            return self.linear(x) + total

    model, x, total = Accumulate().eval(), torch.randn(4, 16), torch.zeros(16)
    before = total.clone()
    aten = _report(model, x, total).graphs[0].aten[0]
    assert aten.quantization_error is None
    # explain runs the function (twice), never the measurement: two increments, not more.
    torch.testing.assert_close(total, before + 2)


def _outlier_model_and_input():
    """The first layer sees one huge channel per row that its weights ignore, so per-token
    int8 rounds the rest of the row, all that matters, to nothing; the second layer sees
    ordinary activations."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    with torch.no_grad():
        model[0].weight[:, 0] = 0
    x = torch.randn(16, 64)
    x[:, 0] = 5000.0
    return model, x


def test_accuracy_budget_keeps_the_sensitive_layer_in_fp32():
    model, x = _outlier_model_and_input()
    with torch.no_grad():
        first, second = jitopt.explain(model, x, quantize="int8").graphs[0].aten[0] \
            .quantized_layers
    # A budget between the two layers' SQNRs (SmoothQuant already rescues most of the
    # outlier channel's damage, so where exactly they land is not the point here).
    sensitive = min(first, second, key=lambda q: q["output_sqnr_db"])
    low, high = sorted(q["output_sqnr_db"] for q in (first, second))
    assert high - low > 0.5
    budget_db = (low + high) / 2
    torch._dynamo.reset()
    options = {"quantize": "int8", "quantize_min_sqnr_db": budget_db}
    with torch.no_grad():
        report = jitopt.explain(model, x, **options)
        budget = torch.compile(model, backend="jitopt", options=options)(x)
        torch._dynamo.reset()
        everything = torch.compile(model, backend="jitopt", options={"quantize": "int8"})(x)
        want = model(x)
    layers = {q["layer"]: q for q in report.graphs[0].aten[0].quantized_layers}
    kept = layers[sensitive["layer"]]
    assert kept["mode"] == "fp32 (kept)" and f"below the budget of {budget_db:g} dB" in kept[
        "reason"]
    assert [q["mode"] for q in layers.values()].count("int8") == 1
    assert f"kept {sensitive['layer']}" in str(report)
    assert (budget - want).abs().max() < (everything - want).abs().max()


def test_budget_without_quantize_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="set quantize too"):
        jitopt.Config.from_options({"quantize_min_sqnr_db": 30})
    with pytest.raises(ValueError, match="number of dB"):
        jitopt.Config.from_options({"quantize": "int8", "quantize_min_sqnr_db": "high"})


def test_weight_memory_is_reported_and_the_fp32_copies_are_dropped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).eval()
    x = torch.randn(8, 256)
    weights = 2 * 256 * 512
    with torch.no_grad():
        fp32 = jitopt.explain(model, x).graphs[0].aten[0].constant_bytes
        int8 = jitopt.explain(model, x, quantize="int8").graphs[0].aten[0].constant_bytes
    assert fp32["float32"] >= 4 * weights
    assert int8["int8"] == weights
    assert int8["float32"] < 4 * (512 + 256) * 3 + 1024  # biases, scales, smoothing only


def test_graphs_with_symbolic_sizes_are_measured_at_this_call_sizes():
    """Regression: a graph compiled with a symbolic batch got no measurement (and int8 no
    SmoothQuant scales), since its example inputs hold the size as a SymInt."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)).eval()
    x = torch.randn(6, 32)
    torch._dynamo.mark_dynamic(x, 0)
    aten = _report(model, x).graphs[0].aten[0]
    assert aten.quantization_error["cosine"] > 0.999
    assert all("output_sqnr_db" in q and q["smoothing"] for q in aten.quantized_layers)


def _deep_mlp():
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [nn.Linear(64, 64), nn.GELU()]
    return nn.Sequential(*layers).eval(), torch.randn(32, 64)


def test_end_to_end_budget_keeps_the_most_sensitive_layers_until_it_holds():
    model, x = _deep_mlp()
    with torch.no_grad():
        free = _report(model, x).graphs[0].aten[0]
    by_sqnr = sorted(free.quantized_layers, key=lambda q: q["output_sqnr_db"])
    error = free.quantization_error["relative_error"]
    budget = error / 3  # reachable only by keeping several layers in fp32
    with torch.no_grad():
        report = jitopt.explain(model, x, quantize="int8", quantize_max_error=budget)
    aten = report.graphs[0].aten[0]
    layers = {q["layer"]: q for q in aten.quantized_layers}
    kept = [name for name, q in layers.items() if q["mode"] == "fp32 (kept)"]
    assert 0 < len(kept) < len(layers)
    # The kept ones are exactly the most sensitive.
    assert set(kept) == {q["layer"] for q in by_sqnr[:len(kept)]}
    assert all("end-to-end budget" in layers[name]["reason"] for name in kept)
    assert aten.quantization_error["relative_error"] <= budget * 1.05
    assert "relative error" in str(report)


def test_a_budget_already_met_keeps_nothing_and_bad_budgets_are_clear_errors():
    import pytest

    model, x = _deep_mlp()
    with torch.no_grad():
        report = jitopt.explain(model, x, quantize="int8", quantize_max_error=0.5)
    assert all(q["mode"] == "int8" for q in report.graphs[0].aten[0].quantized_layers)
    for bad in (0, -1, True, "1%"):
        with pytest.raises(ValueError, match="positive relative error"):
            jitopt.Config.from_options({"quantize": "int8", "quantize_max_error": bad})
    with pytest.raises(ValueError, match="set quantize too"):
        jitopt.Config.from_options({"quantize_max_error": 0.01})
