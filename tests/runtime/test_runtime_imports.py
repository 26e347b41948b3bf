import subprocess
import sys

import torch

from jitopt.runtime.compiled_graph import CompiledGraph


def test_runtime_imports_without_the_compiler():
    code = ("import sys, jitopt.runtime.compiled_graph; "
            "bad = [m for m in sys.modules if m.startswith(('jitopt.passes', 'jitopt.codegen', "
            "'jitopt.compiler', 'jitopt.capture'))]; print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_compiled_graph_runs_a_source_with_bindings():
    source = ('add_Tensor = aten_op("aten::add.Tensor")\n'
              "def run(args):\n    x, = args\n    args.clear()\n"
              "    return (add_Tensor(x, c_one),)\n")
    graph = CompiledGraph(source, {"c_one": torch.ones(3)})
    args = [torch.arange(3.0)]
    (out,) = graph(args)
    assert args == [], "boxed inputs are released by the wrapper"
    assert torch.equal(out, torch.tensor([1.0, 2.0, 3.0]))
