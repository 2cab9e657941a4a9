"""The plan's report: plan.json (every candidate, the front, the pick or why none), plan.md (the table)
and plan.png (p50 against metric, marker area by size, the front joined, the pick starred)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pocketfleet.fs import atomic_write_bytes, atomic_write_json

from .candidates import Candidate

NOISE_NOTE = (
    "Latencies are the medians over {repeats} interleaved repeats (every repeat times all candidates "
    "round-robin with the fp32 references), measured on a shared machine: ratios taken in the same run are "
    "what to compare, absolute ms are noisy."
)


def table(cands: Sequence[Candidate], front: Sequence[Candidate], pick: Candidate | None) -> str:
    on_front = {c.key for c in front}
    head = "| candidate | threads | metric | p50 ms | p95 ms | x fp32 | size KB | front | verdict |"
    lines = [head, "|" + "---|" * 9]
    for c in sorted(cands, key=lambda c: (c.p50_ms or 0)):
        verdict = "PICKED" if pick is not None and c.key == pick.key else ("; ".join(c.rejected) or "ok")
        lines.append(
            f"| {c.name} | {c.threads} | {c.metric:.4f} | {_f(c.p50_ms)} | {_f(c.p95_ms)} | {_f(c.ratio, 3)} | "
            f"{c.size_bytes / 1024:.1f} | {'*' if c.key in on_front else ''} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def _f(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def write_plan_report(report: dict[str, Any], cands: Sequence[Candidate], front: Sequence[Candidate],
                      pick: Candidate | None, out: Path) -> dict[str, str]:  # fmt: skip
    """Write plan.json, plan.md and plan.png into `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "plan.json", "table": out / "plan.md", "plot": out / "plan.png"}
    text = table(cands, front, pick)
    notes = "\n".join(f"- {line}" for line in [*report.get("why_none", []), *report.get("int8_dropped", []),
                                                  *report.get("noise", [])])
    atomic_write_bytes(paths["table"], (text + ("\n" + notes + "\n" if notes else "") + "\n" + report["note"] + "\n").encode())
    _plot(report, cands, front, pick, paths["plot"])
    atomic_write_json(paths["json"], report)
    return {k: str(v) for k, v in paths.items()}


def _plot(report: dict[str, Any], cands: Sequence[Candidate], front: Sequence[Candidate],
          pick: Candidate | None, path: Path) -> None:  # fmt: skip
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.5, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = {("onnx", "fp32"): "tab:blue", ("onnx", "int8"): "tab:orange",
              ("tflite", "fp32"): "tab:green", ("tflite", "int8"): "tab:red"}  # fmt: skip
    timed = [c for c in cands if c.p50_ms is not None]
    big = max((c.size_bytes for c in timed), default=1)
    for (fmt, dtype), color in colors.items():
        pts = [c for c in timed if (c.format, c.dtype) == (fmt, dtype)]
        if pts:
            ax.scatter([c.p50_ms for c in pts], [c.metric for c in pts], s=[20 + 200 * c.size_bytes / big for c in pts],
                       color=color, alpha=0.6, label=f"{fmt} {dtype}")  # fmt: skip
    if front:
        ax.plot([c.p50_ms for c in front], [c.metric for c in front], "k--", lw=0.8, label="Pareto front")
    if pick is not None:
        ax.scatter([pick.p50_ms], [pick.metric], marker="*", s=300, color="gold", edgecolor="k", label="picked")
    budget = report.get("budget_ms")
    if budget:
        ax.axvline(budget, color="gray", ls=":", label=f"latency budget {budget:.4f} ms")
    floor = report.get("metric_floor")
    if floor is not None:
        ax.axhline(floor, color="gray", ls="-.", lw=0.8, label="metric floor (max_drop)")
    ax.set_xlabel(f"p50 latency, ms ({report['device']}, {report['latency_source']}; marker area: size)")
    ax.set_ylabel(report["metric"])
    ax.set_title(f"latency plan: {report['name']}")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
