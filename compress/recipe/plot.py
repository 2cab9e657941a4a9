"""DIR/report.png: the metric against model size, one labelled point per step and per artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .report import rows

_MARKERS = {"onnx": ("s", "tab:orange"), "tflite": ("^", "tab:green"), "pte": ("D", "tab:purple"),
            "coreml": ("v", "tab:gray")}


def write_plot(report: dict[str, Any], path: Path) -> Path:
    """Write the plot with matplotlib's Agg canvas (no display, no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    table = [r for r in rows(report) if r["metric"] is not None]  # a Core ML model off macOS has no metric
    n_model = 1 + sum(1 for s in report["steps"] if s["kind"] == "model")  # the first rows: never dropped
    fig = Figure(figsize=(8.5, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    model_rows, artifact_rows = table[:n_model], table[n_model:]
    ax.plot(
        [r["size_kb"] for r in model_rows], [r["metric"] for r in model_rows], "o-", color="tab:blue",
        label="PyTorch model after each step (fp32 ONNX size)",
    )  # fmt: skip
    for fmt, (marker, color) in _MARKERS.items():
        pts = [r for r in artifact_rows if r["model"].startswith(fmt)]
        if pts:
            ax.scatter([r["size_kb"] for r in pts], [r["metric"] for r in pts], marker=marker, s=60, zorder=3, color=color,
                       label=f"{fmt} artifacts")  # fmt: skip
    for i, r in enumerate(table):
        label = r["stage"] if i < n_model else f"{r['model']} ({r['stage'].split()[-1]})"
        ax.annotate(label, (r["size_kb"], r["metric"]), textcoords="offset points", xytext=(6, 4 + 8 * (i % 2)),
                    fontsize=8)  # fmt: skip
    sizes = [r["size_kb"] for r in table]
    if min(sizes) > 0 and max(sizes) / min(sizes) > 8:
        ax.set_xscale("log")
    metric = report["metric"]
    ax.set_xlabel("model file size (KiB)")
    ax.set_ylabel(f"{metric['name']} ({'higher' if metric['higher_is_better'] else 'lower'} is better)")
    ax.set_title(f"{report['name']}: {metric['name']} vs size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.savefig(path, dpi=120)
    return path
