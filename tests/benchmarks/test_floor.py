"""The floor benchmark on tiny models (quick mode): what it records and reports, not timings."""

import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # benchmarks/ is run from the checkout, never installed

from benchmarks import floor  # noqa: E402


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x)).mean((2, 3))
        y = self.head(y) + self.head(y * 2)  # one distinct call, made twice
        return y @ y.t()  # a matmul of two activations: no weight to pack


def test_recorder_counts_distinct_calls_and_finds_the_weights():
    model = _ConvNet()
    recorder = floor._Recorder({p.untyped_storage().data_ptr() for p in model.parameters()})
    with torch.no_grad(), recorder:
        model(torch.randn(2, 3, 6, 6))
    calls = {c.op: c for c in recorder.calls.values()}
    conv, head, mm = (calls[floor.aten.convolution.default], calls[floor.aten.addmm.default],
                      calls[floor.aten.mm.default])
    assert (conv.count, conv.weight_index) == (1, 1)
    assert (head.count, head.weight_index) == (2, 2)
    assert (mm.count, mm.weight_index) == (1, None)
    assert floor.flops(head) == 2 * 2 * 8 * 5
    assert set(floor.candidates(mm)) == {"aten"}
    assert {"aten", "onednn packed"} <= set(floor.candidates(head))
    for call in (conv, head, mm):  # every way computes what eager computed
        want = call()
        for way in floor.candidates(call).values():
            torch.testing.assert_close(way(), want, rtol=1e-5, atol=1e-5)


def test_quick_run_writes_the_report(tmp_path):
    run = subprocess.run([sys.executable, "-m", "benchmarks.floor", "--quick", "--model", "gpt2",
                          "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    (result,) = json.loads((tmp_path / "floor.json").read_text())
    kinds = {row["call"].split()[0] for row in result["calls"]}
    assert kinds == {"addmm", "mm", "_scaled_dot_product_flash_attention_for_cpu"}
    assert result["hot_floor_s"] > 0 and result["jitopt_s"] > 0 and result["eager_s"] > 0
    report = (tmp_path / "floor.md").read_text()
    assert "| gpt2 |" in report and "at GEMM peak" in report
