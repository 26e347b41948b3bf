"""Long greedy decoding: what the KV cache costs per token as the sequence grows.

    python -m benchmarks.decode                        # GPT-2 124M, 1024 new tokens
    python -m benchmarks.decode --tokens 128 --backends eager,jitopt   # a quick look

GPT-2 (the 124M architecture, random weights; 1100 positions so that an 8-token prompt and
1024 new tokens fit), batch 1, `generate` greedy with Hugging Face's dynamic cache, which
grows every layer's keys and values with `torch.cat`: each step copies the whole cache. Each
backend runs in its own process (clean compile counters and peak memory):

- eager; inductor (`torch.compile` default); jitopt with `kv_cache=False` (cat) and with the
  default `kv_cache=True` (appends into buffers with spare capacity, jitopt/runtime/
  kv_buffer.py); and jitopt with the opt-in `jitopt.Int8KVCache` ("jitopt-int8-kv");
- one generation of --tokens new tokens after a warm-up generation of 16 (which pays the
  compiles of prefill and first steps; the long run still compiles whatever its growing
  length needs, counted in "compiles");
- per-token time from a streamer's timestamps: tokens/s over the first 64, 512 and 1024 new
  tokens, and ms/token around positions 64, 512 and 1024 (median of the 32 tokens before),
  which shows whether a step's cost grows with the length;
- compiles: graphs Dynamo traced during the long generation and in all; peak memory above
  the process's baseline (resident set high-water mark).

Output: a markdown table, decode.json and decode.md in --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

BACKENDS = {"eager": None, "inductor": {"backend": "inductor"},
            "jitopt-cat": {"backend": "jitopt", "options": {"kv_cache": False}},
            "jitopt": {"backend": "jitopt"},
            "jitopt-int8-kv": {"backend": "jitopt", "int8_kv_cache": True}}
MARKS = (64, 512, 1024)
PROMPT = 8
WINDOW = 32


class _Clock:
    """A generate() streamer recording when each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_positions=PROMPT + 1100, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def run_one(backend: str, tokens: int) -> dict[str, Any]:
    """Measure one backend in this process."""
    from benchmarks.measure import PeakMemory

    torch.set_num_threads(2)
    model = _model()
    prompt = torch.randint(1, model.config.vocab_size, (1, PROMPT),
                           generator=torch.Generator().manual_seed(0))
    spec = BACKENDS[backend]
    if spec is not None:
        model.forward = torch.compile(model.forward, backend=spec["backend"],
                                      options=spec.get("options"))
    # Graphs Dynamo traced (its "frames"/"ok" counter also counts frames it only converted
    # without compiling anything, which showed as a compile during the run that never happened).
    stats = torch._dynamo.utils.counters["stats"]
    cache = {}
    if spec is not None and spec.get("int8_kv_cache"):
        import jitopt

        cache = {"past_key_values": lambda: jitopt.Int8KVCache(model.config)}
    with PeakMemory() as memory, torch.no_grad():
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0,
                       **{k: make() for k, make in cache.items()})
        warmup_s = time.perf_counter() - start
        compiles_before = stats["unique_graphs"]
        clock = _Clock()
        begin = time.perf_counter()
        model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                       pad_token_id=0, streamer=clock, **{k: make() for k, make in cache.items()})
    stamps = [begin] + clock.times[1:]  # the streamer's first put() is the prompt
    row: dict[str, Any] = {"backend": backend, "tokens": len(stamps) - 1,
                           "warmup_s": round(warmup_s, 2),
                           "compiles_total": stats["unique_graphs"],
                           "compiles_during_run": stats["unique_graphs"] - compiles_before,
                           "peak_mb": memory.peak_mb}
    for mark in MARKS:
        if mark < len(stamps):
            row[f"tokens_per_s_{mark}"] = mark / (stamps[mark] - stamps[0])
            steps = [b - a for a, b in zip(stamps[mark - WINDOW:mark], stamps[mark - WINDOW + 1:
                                                                              mark + 1])]
            row[f"ms_per_token_at_{mark}"] = 1e3 * statistics.median(steps)
    return row


def markdown(rows: list[dict[str, Any]], tokens: int) -> str:
    marks = [m for m in MARKS if m <= tokens]
    head = (["backend"] + [f"tok/s first {m}" for m in marks]
            + [f"ms/token at {m}" for m in marks]
            + ["compiles (during run / total)", "peak MB", "warm-up s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['error']} |")
            continue
        cells = ([r["backend"]] + [f"{r.get(f'tokens_per_s_{m}', float('nan')):.1f}"
                                   for m in marks]
                 + [f"{r.get(f'ms_per_token_at_{m}', float('nan')):.2f}" for m in marks]
                 + [f"{r['compiles_during_run']} / {r['compiles_total']}",
                    f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "n/a",
                    f"{r['warmup_s']:.1f}"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one backend, in this process
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_one(args.worker, args.tokens)))
        return 0
    rows = []
    for backend in args.backends.split(","):
        if backend not in BACKENDS:
            parser.error(f"unknown backend {backend!r}; valid choices are {list(BACKENDS)}")
        done = subprocess.run([sys.executable, "-m", "benchmarks.decode", "--worker", backend,
                               "--tokens", str(args.tokens)], capture_output=True, text=True)
        try:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        except (IndexError, json.JSONDecodeError):
            rows.append({"backend": backend, "error": done.stderr.strip().splitlines()[-1:]})
        print(markdown(rows[-1:], args.tokens), file=sys.stderr)
    table = markdown(rows, args.tokens)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode.json").write_text(json.dumps(rows, indent=1))
    command = " ".join(["python -m benchmarks.decode", *(argv or sys.argv[1:])])
    (args.out / "decode.md").write_text(f"Command: `{command}`\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
