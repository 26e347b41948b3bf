import warnings

import pytest
import torch
from comparisons import assert_same

import jitopt
from jitopt.codegen.targets import TARGETS, register_target, unregister_target

aten = torch.ops.aten


class PointwiseTarget:
    """A stand-in target that claims relu and sigmoid and runs the partition as given."""

    name = "test-pointwise"

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.lowered = []

    def supports(self, node):
        return node.target in (aten.relu.default, aten.sigmoid.default)

    def lower(self, partition):
        if self.fail:
            raise RuntimeError("this target cannot compile anything")
        self.lowered.append(partition)
        return partition


@pytest.fixture
def target(request):
    t = register_target(PointwiseTarget(fail=getattr(request, "param", False)))
    yield t
    unregister_target(t.name)


def fn(x, w):
    return torch.sigmoid(torch.relu(x @ w)) @ w.t()


def test_supported_chain_becomes_one_partition(target):
    x, w = torch.randn(3, 4), torch.randn(4, 5)
    with torch.no_grad():
        report = jitopt.explain(fn, x, w, targets=[target.name])
        out = torch.compile(fn, backend="jitopt", options={"targets": [target.name]})(x, w)
    assert_same(out, fn(x, w))
    (partition,) = target.lowered[-1:]
    assert [str(n.target) for n in partition.graph.nodes if n.op == "call_function"] == [
        "aten.relu.default", "aten.sigmoid.default"]
    records = report.graphs[0].aten[0].partitions
    assert [(r["target"], r["ops"]) for r in records] == [(target.name, 2), ("aten", 3)]


@pytest.mark.parametrize("target", [True], indirect=True)
def test_failing_target_falls_back_to_aten_with_a_warning(target):
    x, w = torch.randn(3, 4), torch.randn(4, 5)
    compiled = torch.compile(fn, backend="jitopt",
                             options={"targets": [target.name], "on_error": "warn"})
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        assert_same(compiled(x, w), fn(x, w))
    assert any("cannot compile anything" in str(w.message) for w in caught)
    assert jitopt.counters["fallbacks"]["partition"] == 1


@pytest.mark.parametrize("target", [True], indirect=True)
def test_failing_target_raises_when_asked(target):
    compiled = torch.compile(fn, backend="jitopt",
                             options={"targets": [target.name], "on_error": "raise"})
    with pytest.raises(Exception, match="cannot compile anything"), torch.no_grad():
        compiled(torch.randn(3, 4), torch.randn(4, 5))


def test_registry_rejects_duplicates_and_keeps_aten():
    with pytest.raises(ValueError, match="already registered"):
        register_target(TARGETS["aten"])
    with pytest.raises(ValueError, match="cannot be removed"):
        unregister_target("aten")
