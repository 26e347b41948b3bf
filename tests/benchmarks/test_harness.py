"""The benchmark harness itself, on tiny models (quick mode); timings are not asserted."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # benchmarks/ is run from the checkout, never installed

from benchmarks.backends import Backend, all_backends, inductor_freezing  # noqa: E402
from benchmarks.models import MODELS  # noqa: E402
from benchmarks.worker import prepare  # noqa: E402


def test_one_command_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-warm", "--model", "mlp",
         "--model", "gpt2-generate", "--backend", "jitopt", "--backend", "torch-tensorrt",
         "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["peaks"]) == {"fp32_gflops", "fp32_onednn_gflops", "bf16_gflops",
                                     "int8_gops", "copy_gbps"}
    mlp, generate = summary["results"]
    assert [r["backend"] for r in mlp["rows"]] == ["eager", "jitopt", "torch-tensorrt"]
    eager, jit, trt = mlp["rows"]
    assert eager["status"] == jit["status"] == "ok"
    assert jit["max_abs_diff"] < 1e-4 and jit["graphs"] == 1 and jit["median_s"] > 0
    assert trt["status"] == "unavailable" and trt["error"]
    assert generate["rows"][1]["tokens_match"] is True
    table = (out / "results.md").read_text()
    assert "| mlp |" in table and "tok/s" in table and "unavailable" in table
    assert table.strip() in run.stdout
    assert (out / "speedup.png").stat().st_size > 1000


def test_a_failing_backend_is_a_cell_not_a_crash():
    def broken(model, inputs, threads, kind):
        raise RuntimeError("this backend is broken")

    bench = MODELS["mlp"](True)
    args = argparse.Namespace(threads=1, iterations=2, warmup=0, max_seconds=1,
                              first_call_only=False)
    prepared = prepare(bench, Backend("broken", broken), args, reference=None)
    assert prepared.call is None
    assert prepared.row["status"] == "error" and "this backend is broken" in prepared.row["error"]


def test_every_jitopt_mode_is_a_column():
    from jitopt.config import PRESETS

    names = set(all_backends())
    assert {"eager", "inductor", "inductor-freezing", "quantize-dynamic-int8"} <= names
    assert {"jitopt" if m == "default" else f"jitopt-{m}" for m in PRESETS} <= names


@pytest.mark.slow
def test_inductor_freezing_column_really_freezes():
    backend = inductor_freezing()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
    x = torch.randn(2, 8)
    with torch.inference_mode():
        fn = backend.prepare(model, (x,), 1, "forward")
        with backend.compile_context():
            torch.testing.assert_close(fn(x), model(x))
    assert backend.verify() is None
    unpatched = inductor_freezing()  # compiled without its context: the check must object
    assert "never ran" in unpatched.verify()
