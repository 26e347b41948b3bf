"""`python -m benchmarks`: every model in its own process, every backend, one results folder."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmarks.backends import all_backends
from benchmarks.measure import machine_peaks
from benchmarks.models import MODELS
from benchmarks.report import render_markdown, write_plot


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--model", action="append", choices=sorted(MODELS),
                        help="models to run (repeatable; default: all)")
    parser.add_argument("--backend", action="append",
                        help="backends to run (repeatable; default: all); eager always runs")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few iterations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--no-warm", action="store_true",
                        help="skip the second process that measures warm compile times")
    parser.add_argument("--out", default="results", help="results folder")
    args = parser.parse_args(argv)
    known = list(all_backends())
    unknown = sorted(set(args.backend or []) - set(known))
    if unknown:
        parser.error(f"unknown backend(s) {unknown}; choose from {known}")
    args.model = args.model or list(MODELS)
    args.backend = ["eager"] + [b for b in (args.backend or known) if b != "eager"]
    args.iterations = args.iterations or (3 if args.quick else 20)
    return args


def run_worker(model: str, args: argparse.Namespace, cache: str, *, first_call_only: bool,
               bar: tqdm) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        path = out.name
    command = [sys.executable, "-m", "benchmarks.worker", "--model", model, "--out", path,
               "--threads", str(args.threads), "--iterations", str(args.iterations)]
    command += [f"--backend={b}" for b in args.backend]
    command += ["--quick"] * args.quick + ["--first-call-only"] * first_call_only
    if args.quick:
        command += ["--warmup", "1", "--max-seconds", "5"]
    # Both compilers' on-disk caches start empty, so the first pass measures a cold compile.
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor"),
           "JITOPT_CACHE_DIR": os.path.join(cache, "jitopt"), "OMP_NUM_THREADS": str(args.threads)}
    phase = "warm compile" if first_call_only else "measure"
    # stderr goes to a file: a worker that warns a lot would otherwise fill the pipe while
    # this loop reads stdout, and both would wait for ever.
    with tempfile.TemporaryFile("w+") as errors, subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=errors, text=True, env=env,
            cwd=Path(__file__).resolve().parent.parent) as proc:
        for line in proc.stdout:
            if line.startswith("@@ "):
                bar.set_description(f"{model} / {line[3:].strip()} ({phase})")
                bar.update(1)
        proc.wait()
        errors.seek(0)
        stderr = errors.read()
    if proc.returncode != 0:
        return {"model": model, "rows": [{"backend": b, "status": "error",
                                          "error": f"worker crashed: {stderr.strip()[-300:]}"}
                                         for b in args.backend]}
    return json.loads(Path(path).read_text())


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print("measuring the machine's peaks ...", file=sys.stderr)
    peaks = machine_peaks(args.quick)
    passes = 1 if args.no_warm else 2
    results = []
    started = time.time()
    with tempfile.TemporaryDirectory() as cache, tqdm(
            total=len(args.model) * len(args.backend) * passes, unit="cell") as bar:
        for model in args.model:
            result = run_worker(model, args, cache, first_call_only=False, bar=bar)
            if not args.no_warm:  # same compile caches, a fresh process
                warm = run_worker(model, args, cache, first_call_only=True, bar=bar)
                for row, warm_row in zip(result["rows"], warm["rows"]):
                    row["warm_first_call_s"] = warm_row.get("first_call_s")
            results.append(result)
    summary = {"machine": machine_description(args.threads), "peaks": peaks,
               "command": "python -m benchmarks " + " ".join(argv or sys.argv[1:]),
               "seconds": time.time() - started, "results": results}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1))
    table = render_markdown(summary)
    (out_dir / "results.md").write_text(table)
    write_plot(summary, out_dir / "speedup.png")
    print(table)
    print(f"\nwritten: {out_dir}/results.json, results.md, speedup.png", file=sys.stderr)
    return out_dir


def machine_description(threads: int) -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{cpu}, {os.cpu_count()} cores, {threads} threads; Python "
            f"{platform.python_version()}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
