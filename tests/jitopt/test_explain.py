import torch
import torch.nn as nn

import jitopt


class TwoGraphs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        torch._dynamo.graph_break()
        return self.fc(y.mean((2, 3)))


def test_report_covers_graphs_breaks_passes_partitions_and_time():
    model = TwoGraphs().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        report = jitopt.explain(model, x)
    assert len(report.graphs) == 2
    assert len(report.graph_breaks) == 1 and "graph_break" in report.graph_breaks[0]
    first = report.graphs[0].aten[0]
    assert first.kind == "inference" and first.frozen_inputs > 0
    changed = {p["name"]: p["changed"] for p in first.passes}
    assert changed["fold_conv_bn"] == 1
    assert all(p["seconds"] >= 0 for p in first.passes)
    assert first.partitions[-1]["target"] == "aten"
    assert first.ops_final < first.ops_captured
    assert report.compile_seconds > 0 and report.fallbacks == []

    text = str(report)
    for needle in ("2 graph(s)", "1 graph break(s)", "pass fold_conv_bn", "partition inline",
                   "weights frozen"):
        assert needle in text, needle
    as_dict = report.to_dict()
    assert as_dict["graphs"][0]["aten"][0]["passes"][2]["name"] == "fold_conv_bn"
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="jitopt")(x), model(x))


def test_debug_dir_gets_numbered_dumps(tmp_path):
    model = TwoGraphs().eval()
    with torch.no_grad():
        torch.compile(model, backend="jitopt", options={"debug_dir": str(tmp_path)})(
            torch.randn(1, 3, 6, 6))
    dumps = sorted(p.name for p in tmp_path.glob("inference_*/*"))
    assert "000_captured.py" in dumps and "003_fold_conv_bn.py" in dumps
    wrappers = list(tmp_path.glob("inference_*/*_wrapper.py"))
    assert len(wrappers) == 2
    assert "def run(args):" in wrappers[0].read_text()
