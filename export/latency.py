"""Latency of model files in their own runtime (export.runtimes), measured with pocketfleet.timing:
round-robin across the files, so that load from other processes hits every candidate alike."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pocketfleet.timing import time_interleaved

WARM_BLOCK = 10  # consecutive calls of one file per turn: each is timed warm, as a device runs its one model


def measure_latency(
    models: Mapping[str, str | Path],
    inputs: Mapping[str, np.ndarray],
    threads: int = 1,
    runs: int = 50,
    warmup: int = 5,
    min_seconds: float = 0.0,
    formats: Mapping[str, str] | None = None,
    block: int = WARM_BLOCK,
) -> dict[str, dict[str, Any]]:
    """{name: {"p50", "p90", "p95", "mean", "cpu_p50", "runs", "threads"}} in milliseconds for calls on
    `inputs` (each model takes the inputs it names): rounds of `block` consecutive calls of each model in
    turn, `runs` calls each at least, more while `min_seconds` has not passed. With block = 1 every call
    follows the other files' calls, so the caches hold their weights, not this one's: on digits-mbnet that
    cold regime put TFLite int8 at 1.02-1.22x its fp32 and warm blocks of 50 at 0.81-0.84x."""
    from export.runtimes import load_runtime

    runtimes = {
        name: load_runtime(path, format=(formats or {}).get(name), threads=threads) for name, path in models.items()
    }
    feeds = {name: {s.name: inputs[s.name] for s in rt.inputs} for name, rt in runtimes.items()}
    stats = time_interleaved(
        {name: (lambda rt=rt, feed=feeds[name]: rt.run(feed)) for name, rt in runtimes.items()},
        min_runs=runs, min_seconds=min_seconds, warmup_seconds=0.0, warmup_runs=warmup, block=block,
    )  # fmt: skip
    return {
        name: {"p50": s.p50_ms, "p90": s.p90_ms, "p95": s.p95_ms, "mean": s.mean_ms, "cpu_p50": s.cpu_p50_ms,
               "runs": s.runs, "threads": threads}
        for name, s in stats.items()
    }


def single_input(inputs: Mapping[str, np.ndarray], batch: int = 1) -> dict[str, np.ndarray]:
    """The first `batch` rows of each input (a batch-1 latency probe from real data)."""
    return {k: np.ascontiguousarray(v[:batch]) for k, v in inputs.items()}
