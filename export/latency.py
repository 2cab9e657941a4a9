"""Latency of model files in their own runtime (export.runtimes), measured with pocketfleet.timing:
round-robin across the files, so that load from other processes hits every candidate alike."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pocketfleet.timing import time_interleaved


def measure_latency(
    models: Mapping[str, str | Path],
    inputs: Mapping[str, np.ndarray],
    threads: int = 1,
    runs: int = 50,
    warmup: int = 5,
    min_seconds: float = 0.0,
    formats: Mapping[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """{name: {"p50", "p90", "p95", "mean", "cpu_p50", "runs", "threads"}} in milliseconds for one call on
    `inputs` (each model takes the inputs it names) per round, `runs` rounds at least, more while
    `min_seconds` has not passed."""
    from export.runtimes import load_runtime

    runtimes = {
        name: load_runtime(path, format=(formats or {}).get(name), threads=threads) for name, path in models.items()
    }
    feeds = {name: {s.name: inputs[s.name] for s in rt.inputs} for name, rt in runtimes.items()}
    stats = time_interleaved(
        {name: (lambda rt=rt, feed=feeds[name]: rt.run(feed)) for name, rt in runtimes.items()},
        min_runs=runs, min_seconds=min_seconds, warmup_seconds=0.0, warmup_runs=warmup,
    )  # fmt: skip
    return {
        name: {"p50": s.p50_ms, "p90": s.p90_ms, "p95": s.p95_ms, "mean": s.mean_ms, "cpu_p50": s.cpu_p50_ms,
               "runs": s.runs, "threads": threads}
        for name, s in stats.items()
    }


def single_input(inputs: Mapping[str, np.ndarray], batch: int = 1) -> dict[str, np.ndarray]:
    """The first `batch` rows of each input (a batch-1 latency probe from real data)."""
    return {k: np.ascontiguousarray(v[:batch]) for k, v in inputs.items()}
