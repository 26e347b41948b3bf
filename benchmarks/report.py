"""Render results: a markdown table for people, a PNG plot for the README."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _eager(result: dict[str, Any]) -> dict[str, Any] | None:
    return next((r for r in result["rows"] if r["backend"] == "eager" and r["status"] == "ok"),
                None)


def speedup(result: dict[str, Any], row: dict[str, Any]) -> float | None:
    eager = _eager(result)
    if row["status"] != "ok" or eager is None or "median_s" not in row:
        return None
    return eager["median_s"] / row["median_s"]


def _latency(result: dict[str, Any], row: dict[str, Any]) -> str:
    if result["kind"] == "generate":
        tokens = result["new_tokens"]
        return (f"{tokens / row['median_s']:.1f} tok/s "
                f"({tokens / row['p90_s']:.1f}-{tokens / row['p10_s']:.1f})")
    return (f"{row['median_s'] * 1e3:.2f} ms "
            f"({row['p10_s'] * 1e3:.2f}-{row['p90_s'] * 1e3:.2f})")


def compile_seconds(row: dict[str, Any]) -> float | None:
    """Cold compile time: the first call less one steady call (what the first call also
    computes), so a slow model does not look like a slow compiler."""
    if row["status"] != "ok" or "median_s" not in row or row.get("first_call_s") is None:
        return None
    return max(row["first_call_s"] - row["median_s"], 0.0)


def _accuracy(row: dict[str, Any]) -> str:
    if "tokens_match" in row:
        return "tokens match" if row["tokens_match"] else "TOKENS DIFFER"
    return f"{row['max_abs_diff']:.1e}" if "max_abs_diff" in row else ""


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _row(result: dict[str, Any], row: dict[str, Any], peak_gflops: float) -> str:
    if row["status"] != "ok":
        return f"| {row['backend']} | {row['status']}: {row.get('error', '')} |" + " |" * 9
    fraction = (f"{result['flops'] / row['median_s'] / 1e9 / peak_gflops:.0%}"
                if result.get("flops") else "")
    cells = [row["backend"], _latency(result, row), _fmt(speedup(result, row), ".2f") + "x",
             _fmt(row.get("first_call_s"), ".2f"), _fmt(compile_seconds(row), ".2f"),
             _fmt(row.get("warm_first_call_s"), ".2f"),
             _fmt(row.get("peak_mb"), ".0f"),
             f"{row['graphs']} / {row['graph_breaks']} / {row['recompiles']}",
             _accuracy(row), fraction]
    return "| " + " | ".join(cells) + " |"


def render_markdown(summary: dict[str, Any]) -> str:
    peaks = summary["peaks"]
    lines = [f"Machine: {summary['machine']}.",
             f"Peaks measured this run: fp32 matmul {peaks['fp32_gflops']:.0f} GFLOP/s "
             f"(oneDNN, packed weight: {peaks.get('fp32_onednn_gflops', 0):.0f}), "
             f"bf16 {peaks['bf16_gflops']:.0f} GFLOP/s, int8 {peaks['int8_gops']:.0f} GOP/s, "
             f"copy {peaks['copy_gbps']:.1f} GB/s.", f"Command: `{summary['command']}`", ""]
    lines += _speedup_matrix(summary)
    lines += [""] + _compile_matrix(summary)
    for result in summary["results"]:
        lines += ["", f"### {result['model']}", "",
                  "| backend | median (p10-p90) | vs eager | compile + first call s "
                  "| cold compile s | warm, s | peak MB | graphs / breaks / recompiles "
                  "| accuracy vs eager | of best fp32 matmul peak |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        best = max(peaks["fp32_gflops"], peaks.get("fp32_onednn_gflops", 0.0))
        lines += [_row(result, row, best) for row in result["rows"]]
    return "\n".join(lines) + "\n"


def _speedup_matrix(summary: dict[str, Any]) -> list[str]:
    backends = [r["backend"] for r in summary["results"][0]["rows"]] if summary["results"] else []
    lines = ["Speedup over eager (median latency; generation: tokens/s):", "",
             "| model | " + " | ".join(backends) + " |", "|---" * (len(backends) + 1) + "|"]
    for result in summary["results"]:
        cells = []
        for row in result["rows"]:
            s = speedup(result, row)
            cells.append(f"{s:.2f}x" if s is not None else row["status"])
        lines.append(f"| {result['model']} | " + " | ".join(cells) + " |")
    return lines


def write_plot(summary: dict[str, Any], path: Path) -> None:
    """Grouped bars: speedup per model per backend, and first-call (compile) time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = summary["results"]
    backends = [r["backend"] for r in results[0]["rows"]] if results else []
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(results) + 4), 8))
    width = 0.8 / max(len(backends), 1)
    colors = plt.cm.tab20.colors  # 20 distinct colours: one per column, none repeated
    for i, name in enumerate(backends):
        xs = [m + i * width for m in range(len(results))]
        rows = [next(r for r in res["rows"] if r["backend"] == name) for res in results]
        color = colors[i % len(colors)]
        ax1.bar(xs, [speedup(res, r) or 0 for res, r in zip(results, rows)], width, label=name,
                color=color)
        ax2.bar(xs, [r.get("first_call_s") or 0 for r in rows], width, label=name, color=color)
    for ax in (ax1, ax2):
        ax.set_xticks([m + 0.4 - width / 2 for m in range(len(results))],
                      [r["model"] for r in results])
    ax1.axhline(1.0, color="black", linewidth=0.8)
    ax1.set_ylabel("speedup over eager")
    ax2.set_ylabel("compile + first call, s")
    ax2.set_yscale("log")
    ax1.legend(fontsize=7, ncol=3)
    ax1.set_title(summary["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _compile_matrix(summary: dict[str, Any]) -> list[str]:
    backends = [r["backend"] for r in summary["results"][0]["rows"]
                if r["backend"] != "eager"] if summary["results"] else []
    lines = ["Cold compile seconds (first call with empty compile caches, less one steady "
             "call):", "", "| model | " + " | ".join(backends) + " |",
             "|---" * (len(backends) + 1) + "|"]
    for result in summary["results"]:
        cells = [_fmt(compile_seconds(row), ".2f") or row["status"]
                 for row in result["rows"] if row["backend"] != "eager"]
        lines.append(f"| {result['model']} | " + " | ".join(cells) + " |")
    return lines
