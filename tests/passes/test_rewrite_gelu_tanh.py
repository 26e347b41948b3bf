"""GELU's tanh approximation written out (Hugging Face's gelu_new) to one tanh-GELU."""

import math

import torch
import torch.nn as nn
from comparisons import assert_same

import jitopt


def gelu_new(x):
    """Hugging Face's NewGELUActivation, verbatim."""
    return 0.5 * x * (1.0 + torch.tanh(
        math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _compile(fn, *args):
    with torch.no_grad():
        assert_same(torch.compile(fn, backend="jitopt")(*args), fn(*args), atol=1e-5, rtol=1e-5)
    return jitopt.counters["passes"]["rewrite_gelu_tanh"]


def test_written_out_gelu_becomes_one_op():
    assert _compile(gelu_new, torch.randn(8, 32) * 4) == 1


def test_after_a_linear_it_becomes_the_post_op():
    model = nn.Linear(16, 32).eval()
    x = torch.randn(4, 16) * 3
    assert _compile(lambda x: gelu_new(model(x)), x) == 1
    assert jitopt.counters["passes"]["fuse_linear_epilogues"] == 1


def test_the_new_op_carries_its_output_metadata():
    """Regression: the replacement got the pattern's (empty) metadata, so a fused group reading
    the GELU's output from outside (an int8 linear's scaling) failed to lower."""
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8)).eval()
    fn = lambda x: model[1](gelu_new(model[0](x)) * 2)  # noqa: E731 (not a linear post-op)
    with torch.no_grad():
        report = jitopt.explain(fn, torch.randn(4, 16), quantize="int8", on_error="raise")
    gm_passes = report.graphs[0].aten[0].passes
    assert any(p["name"] == "rewrite_gelu_tanh" and p["changed"] == 1 for p in gm_passes)
    assert not report.graphs[0].aten[0].fallbacks


def test_intermediate_with_another_user_is_left_alone():
    def fn(x):
        cubic = torch.pow(x, 3.0)
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * cubic)
        return 0.5 * x * (1.0 + torch.tanh(inner)), cubic

    assert _compile(fn, torch.randn(8, 32)) == 0


def test_other_constants_are_left_alone():
    def almost(x):
        return 0.5 * x * (1.0 + torch.tanh(0.8 * (x + 0.044715 * torch.pow(x, 3.0))))

    assert _compile(almost, torch.randn(8, 32)) == 0


def test_integer_input_is_left_alone():
    assert _compile(gelu_new, torch.arange(-8, 8)) == 0
