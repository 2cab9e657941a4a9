"""Wall-clock latency of a callable: warm-up, then percentiles over enough runs (torch-free).

Used wherever a latency is reported (demo, compression reports, device estimates, benchmarks), so that
every number is measured the same way. On a shared machine compare ratios taken in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    runs: int

    def to_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def summarize(seconds: list[float] | np.ndarray) -> LatencyStats:
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        raise ValueError("no timings to summarize")
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return LatencyStats(float(p50), float(p90), float(p99), float(ms.mean()), int(ms.size))


def time_calls(
    fn: Callable[[], object],
    min_runs: int = 20,
    min_seconds: float = 1.0,
    max_runs: int = 20_000,
    warmup_seconds: float = 0.2,
) -> LatencyStats:
    """Call `fn` until both `min_runs` and `min_seconds` are reached (at most `max_runs`)."""
    warm_until = time.perf_counter() + warmup_seconds
    for i in range(10_000):
        fn()
        if i >= 4 and time.perf_counter() >= warm_until:
            break
    times: list[float] = []
    end = time.perf_counter() + min_seconds
    while len(times) < min_runs or (time.perf_counter() < end and len(times) < max_runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return summarize(times)
