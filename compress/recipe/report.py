"""report.json writing and the human-readable table of a recipe run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def write_report(report: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per measured model: the baseline, every step, every artifact (what the plot shows)."""
    out = [_row("baseline", "onnx/fp32", report["baseline"])]
    for s in report["steps"]:
        if s["kind"] == "model":
            out.append(_row(f"steps[{s['index']}] {s['type']}", "onnx/fp32", s))
    for a in report["artifacts"]:
        stage = f"targets[{a['target']}] {a['mode']}"
        out.append(_row(stage, f"{a['format']}/{a['dtype']}", a, device=a.get("device")))
    return out


def _row(stage: str, kind: str, m: dict[str, Any], device: dict[str, Any] | None = None) -> dict[str, Any]:
    lat = m.get("latency_ms") if isinstance(m.get("latency_ms"), dict) else {}
    return {
        "stage": stage,
        "model": kind,
        "metric": (m["metric"] or {}).get("value"),  # None: not run (a Core ML model off macOS)
        "size_kb": round(m["size_bytes"] / 1024, 1),
        "zstd_kb": round(m["size_zstd_bytes"] / 1024, 1),
        "mmacs": round(m["macs"] / 1e6, 3) if m["macs"] is not None else None,
        "p50_ms": lat.get("p50"),
        "p90_ms": lat.get("p90"),
        "device_ms": f"{device['estimated_ms']:.3g} ({device['device']})" if device and device.get("estimated_ms") else "",
    }


def render(report: dict[str, Any]) -> str:
    """The human output of `pocketfleet compress`: a table and where the report went."""
    from pocketfleet import table

    metric = report["metric"]
    head = (
        f"{report['name']} ({report['model']['workload']}): {metric['name']} "
        f"({'higher' if metric['higher_is_better'] else 'lower'} is better), "
        f"latency on this host with {report['host']['threads']} thread(s), batch 1"
    )
    lines = [head, "", table(rows(report))]
    for a in report["artifacts"]:
        if a["float_layers"]:
            lines.append(
                f"targets[{a['target']}] {a['format']}/{a['dtype']} keeps in float: {', '.join(a['float_layers'])}"
            )
    for f in report.get("failed", []):
        lines.append(f"targets[{f['target']}] {f['format']}/{f['dtype']} FAILED: {f['error']}")
    out_dir = Path(report["baseline"]["path"]).parent.parent
    lines.append(
        f"\nreport: {out_dir / 'report.json'}  plot: {out_dir / 'report.png'}  ({report['seconds']:.0f} s)"
    )
    return "\n".join(lines)


def render_plan(recipe: dict[str, Any]) -> str:
    """`pocketfleet compress --check`: what the validated recipe will do."""
    model = recipe["model"]
    if model.get("factory"):
        source = f"factory {model['factory']}" + (f" with weights {model['weights']}" if model.get("weights") else "")
        source += f", inputs {', '.join(f'{k} {v}' for k, v in model['inputs'].items())}"
    elif model.get("onnx"):
        source = f"onnx {model['onnx']}"
    else:
        source = f"zoo {model['zoo']} (made into DIR/model)" if model["zoo"] else model["path"]
    steps = [
        s["type"] + (f" ({s['mode']})" if "mode" in s and s["type"] == "quantize" else "")
        for s in recipe["steps"]
    ]
    targets = [
        f"{t['format']}/{t['dtype']}"
        + (f" for {t['device']}" if t["device"] else "")
        + (" signed" if t["key"] else "")
        for t in recipe["targets"]
    ]
    return "\n".join(
        [
            f"{recipe['file']}: OK",
            f"model:   {recipe['workload']} from {source}",
            f"steps:   {' -> '.join(steps) if steps else '(none)'}",
            f"targets: {', '.join(targets)}",
        ]
    )
