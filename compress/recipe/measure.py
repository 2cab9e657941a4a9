"""Measurements shared by every row of a report: the workload metric, file size (raw and zstd), MACs
and parameters of the file (devices.analyze_model), and host latency in the file's own runtime
(edge_agent.runtimes timed by devices.timing.time_calls, batch 1 of real test data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .schema import RunSettings

ZSTD_MAX_LEVEL_BYTES = 16 << 20  # larger files are compressed at a fast level (level 19 takes minutes)


def host_latency(path: Path, inputs: dict[str, np.ndarray], run: RunSettings) -> dict[str, Any]:
    """{"p50", "p90", "p99", "mean", "cpu_p50", "runs", "threads"} in ms for one batch-1 call."""
    from devices.timing import time_calls
    from edge_agent.runtimes import load_runtime

    runtime = load_runtime(path, threads=run.threads)
    feeds = {s.name: inputs[s.name] for s in runtime.inputs}
    stats = time_calls(lambda: runtime.run(feeds), min_runs=run.latency_runs, min_seconds=run.latency_seconds)
    out = {
        "p50": round(stats.p50_ms, 4),
        "p90": round(stats.p90_ms, 4),
        "p99": round(stats.p99_ms, 4),
        "mean": round(stats.mean_ms, 4),
        "runs": stats.runs,
        "threads": run.threads,
    }
    if stats.cpu_p50_ms is not None:
        out["cpu_p50"] = round(stats.cpu_p50_ms, 4)
    return out


def file_costs(path: Path) -> dict[str, Any]:
    """Size (raw and zstd-compressed: what zeros from sparsity save on disk), MACs and parameters."""
    from compress.prune import storage_sizes
    from devices import analyze_model

    size = path.stat().st_size
    level = 19 if size <= ZSTD_MAX_LEVEL_BYTES else 3
    analysis = analyze_model(path)
    return {
        "size_bytes": size,
        "size_zstd_bytes": storage_sizes(path, level=level)["zstd_bytes"],
        "zstd_level": level,
        "macs": int(analysis.macs),
        "params": int(analysis.params_count),
        "peak_activation_bytes": int(analysis.peak_activation_bytes),
    }


def clean_metric(metric: dict[str, Any]) -> dict[str, Any]:
    """A JSON-safe copy of a workload metric dict."""
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in metric.items()}


def probe_inputs(workload: Any) -> dict[str, np.ndarray]:
    """One real test row per input (the batch-1 latency probe)."""
    return {k: np.ascontiguousarray(v) for k, v in workload.sample_inputs(1).items()}
