"""The kernel microbenchmark on tiny tensors, eager and jitopt only (Inductor compiles too slowly
for a fast test); timings are not asserted."""

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # benchmarks/ is run from the checkout, never installed

from benchmarks import kernels  # noqa: E402

TINY = ["--size-scale", "0.005", "--rounds", "1", "--backends", "eager,jitopt"]


def test_writes_json_and_table_with_every_kernel_verified(tmp_path, capsys):
    cache_dirs = {name: os.environ.get(name) for name in kernels.CACHE_ENV}
    assert kernels.main(["--out", str(tmp_path), *TINY]) == 0
    summary = json.loads((tmp_path / "kernels.json").read_text())
    assert summary["failures"] == [] and summary["backends"] == ["eager", "jitopt"]
    assert summary["copy_gbps"] > 0 and summary["clone_gbps"] > 0
    assert [r["kernel"] for r in summary["results"]] == ["chain6", "softmax", "layernorm"]
    for result in summary["results"]:
        eager, jit = result["rows"]
        assert eager["status"] == jit["status"] == "ok", result
        assert jit["fallbacks"] == 0 and jit["max_abs_diff"] >= 0
        assert jit["median_s"] > 0 and jit["gbps"] > 0 and jit["cold_compile_s"] > 0
        assert isinstance(result["unmet_targets"], list)
    table = (tmp_path / "kernels.md").read_text()
    assert "| chain6 |" in table and "MISMATCH" not in table
    assert table.strip() in capsys.readouterr().out
    assert {name: os.environ.get(name) for name in kernels.CACHE_ENV} == cache_dirs  # restored


def test_a_mismatch_is_loud_and_fails_the_run(tmp_path, monkeypatch):
    compiled = kernels.compiled

    def wrong_jitopt(fn, backend):
        if backend != "jitopt":
            return compiled(fn, backend)
        right = compiled(fn, backend)
        return lambda *inputs: right(*inputs) + 1

    monkeypatch.setattr(kernels, "compiled", wrong_jitopt)
    assert kernels.main(["--out", str(tmp_path), "--only", "softmax", *TINY]) == 1
    summary = json.loads((tmp_path / "kernels.json").read_text())
    eager, jit = summary["results"][0]["rows"]
    assert eager["status"] == "ok" and jit["status"] == "mismatch" and "median_s" not in jit
    assert "**MISMATCH**" in (tmp_path / "kernels.md").read_text()
    assert summary["failures"] and "softmax / jitopt" in summary["failures"][0]


def test_rejects_an_unknown_backend(capsys):
    with pytest.raises(SystemExit):
        kernels.parse_args(["--backends", "eager,tvm"])
    assert "tvm" in capsys.readouterr().err
