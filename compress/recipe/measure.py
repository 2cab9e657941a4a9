"""Measurements shared by every row of a report: the workload metric, file size (raw and zstd), MACs
and parameters of the file (devices.analyze_model), and host latency in the file's own runtime
(export.runtimes, batch 1 of real test data, all files of a run timed round-robin together)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .schema import RunSettings

ZSTD_MAX_LEVEL_BYTES = 16 << 20  # larger files are compressed at a fast level (level 19 takes minutes)


def host_latencies(
    models: dict[str, Path], inputs: dict[str, np.ndarray], run: RunSettings
) -> dict[str, dict[str, Any]]:
    """{name: {"p50", "p90", "mean", "runs", "threads"}} in ms for one batch-1 call of every model in its
    own runtime, measured round-robin (every round runs each model once, in turn) so that load from other
    processes hits all rows of a report alike: at least `run.latency_runs` calls each, and
    `run.latency_seconds` per model in all."""
    from compress.quantize import measure_latency

    if not models:
        return {}
    stats = measure_latency(
        models,
        inputs,
        threads=run.threads,
        runs=run.latency_runs,
        min_seconds=run.latency_seconds * len(models),
    )
    return {
        name: {k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()}
        for name, s in stats.items()
    }


def file_costs(path: Path) -> dict[str, Any]:
    """Size (raw and zstd-compressed: what zeros from sparsity save on disk), MACs and parameters (None
    for formats devices.analyze_model cannot read: ExecuTorch and Core ML programs)."""
    from compress.prune import storage_sizes
    from devices import analyze_model
    from devices.graph import GRAPH_FORMATS

    size = path.stat().st_size
    level = 19 if size <= ZSTD_MAX_LEVEL_BYTES else 3
    costs: dict[str, Any] = {
        "size_bytes": size,
        "size_zstd_bytes": storage_sizes(path, level=level)["zstd_bytes"],
        "zstd_level": level,
        "macs": None,
        "params": None,
        "peak_activation_bytes": None,
    }
    if path.suffix.lower() in GRAPH_FORMATS:
        analysis = analyze_model(path)
        costs.update(macs=int(analysis.macs), params=int(analysis.params_count),
                     peak_activation_bytes=int(analysis.peak_activation_bytes))  # fmt: skip
    return costs


def clean_metric(metric: dict[str, Any]) -> dict[str, Any]:
    """A JSON-safe copy of a workload metric dict."""
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in metric.items()}


def probe_inputs(workload: Any) -> dict[str, np.ndarray]:
    """One real test row per input (the batch-1 latency probe)."""
    return {k: np.ascontiguousarray(v) for k, v in workload.sample_inputs(1).items()}
