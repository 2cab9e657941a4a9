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
    # median CPU time of the calling thread: on a shared, loaded machine the wall clock also counts time
    # spent waiting for a core; single-threaded runtimes compute on the calling thread
    cpu_p50_ms: float | None = None

    def to_dict(self) -> dict[str, float | int]:
        return {
            k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items() if v is not None
        }


def summarize(
    seconds: list[float] | np.ndarray, cpu_seconds: list[float] | np.ndarray | None = None
) -> LatencyStats:
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        raise ValueError("no timings to summarize")
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    cpu = float(np.median(cpu_seconds) * 1e3) if cpu_seconds is not None and len(cpu_seconds) else None
    return LatencyStats(float(p50), float(p90), float(p99), float(ms.mean()), int(ms.size), cpu)


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
    cpu: list[float] = []
    end = time.perf_counter() + min_seconds
    while len(times) < min_runs or (time.perf_counter() < end and len(times) < max_runs):
        start, start_cpu = time.perf_counter(), time.thread_time()
        fn()
        cpu.append(time.thread_time() - start_cpu)
        times.append(time.perf_counter() - start)
    return summarize(times, cpu)
