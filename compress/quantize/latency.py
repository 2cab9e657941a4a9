"""Latency of model files in their own runtime (export.runtimes), measured round-robin: every
round runs each model once, in turn, so that load from other processes hits all of them alike."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def measure_latency(
    models: Mapping[str, str | Path],
    inputs: Mapping[str, np.ndarray],
    threads: int = 1,
    runs: int = 50,
    warmup: int = 5,
    min_seconds: float = 0.0,
    formats: Mapping[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """{name: {"p50", "p90", "mean", "runs"}} in milliseconds for one batch of `inputs` per run.

    Runs interleave the models (round-robin) `runs` times, more while `min_seconds` has not passed.
    """
    from export.runtimes import load_runtime

    runtimes = {
        name: load_runtime(path, format=(formats or {}).get(name), threads=threads)
        for name, path in models.items()
    }
    feeds = {name: {s.name: inputs[s.name] for s in rt.inputs} for name, rt in runtimes.items()}
    for _ in range(warmup):
        for name, rt in runtimes.items():
            rt.run(feeds[name])
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    end = time.perf_counter() + min_seconds
    done = 0
    while done < runs or time.perf_counter() < end:
        for name, rt in runtimes.items():
            start = time.perf_counter()
            rt.run(feeds[name])
            times[name].append((time.perf_counter() - start) * 1e3)
        done += 1
    return {
        name: {
            "p50": float(np.percentile(t, 50)),
            "p90": float(np.percentile(t, 90)),
            "mean": float(np.mean(t)),
            "runs": len(t),
            "threads": threads,
        }
        for name, t in times.items()
    }


def single_input(inputs: Mapping[str, np.ndarray], batch: int = 1) -> dict[str, np.ndarray]:
    """The first `batch` rows of each input (a batch-1 latency probe from real data)."""
    return {k: np.ascontiguousarray(v[:batch]) for k, v in inputs.items()}
