"""Where jitopt may replay a graph from a CUDA graph, decided here on fake CUDA tensors (the
replay itself is checked on a GPU by tests/models/test_cuda_models.py)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from jitopt.compiler import _FrozenVariants
from jitopt.config import Config
from jitopt.report import AtenGraphReport
from jitopt.runtime.compiled_graph import FrozenInput
from jitopt.runtime.cuda_graph import CudaGraphRunner


def _variants(device, symbolic=False, **options):
    with FakeTensorMode(allow_non_fake_inputs=True):
        args = [torch.randn(4, 8, device=device), torch.randn(8, 8, device=device)]
        gm = make_fx(lambda x, w: torch.relu(x @ w))(*args)
    if symbolic:  # the first input's rows become a symbolic size, as Dynamo's dynamic dims
        env = ShapeEnv()
        with FakeTensorMode(shape_env=env):
            rows = env.create_unbacked_symint()
            x = next(n for n in gm.graph.nodes if n.op == "placeholder")
            x.meta["val"] = torch.empty(rows, 8, device=device)
    return _FrozenVariants(gm, "inference", Config(**options), AtenGraphReport("inference")), gm


def test_static_cuda_graphs_replay_copying_only_the_live_inputs():
    variants, gm = _variants("cuda")
    frozen = [FrozenInput(1, torch.zeros(1))]
    assert variants._cuda_graph_inputs(frozen, gm, "def run(args): ...") == [0]
    assert variants._cuda_graph_inputs([], gm, "def run(args): ...") == [0, 1]


@pytest.mark.parametrize("case", ["cpu", "symbolic", "runtime function", "option off"])
def test_other_graphs_run_as_compiled(case):
    variants, gm = _variants("cpu" if case == "cpu" else "cuda", symbolic=case == "symbolic",
                             **({"cuda_graphs": False} if case == "option off" else {}))
    source = 'kv_append = python_function("x")' if case == "runtime function" else ""
    assert variants._cuda_graph_inputs([], gm, source) is None


def test_the_runner_runs_uncaptured_once_declined():
    calls = []

    def run(args):
        calls.append(list(args))
        args.clear()
        return (torch.ones(1),)

    runner = CudaGraphRunner(run, live=[0])
    runner.disabled = True
    assert runner([torch.zeros(1)])[0].item() == 1.0
    assert len(calls) == 1 and runner.graph is None
