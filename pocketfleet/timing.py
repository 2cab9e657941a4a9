"""Wall-clock latency of callables: warm-up, then percentiles over enough runs (torch-free).

The one latency measurement of the project: every latency reported (demo, compression reports, device
estimates, benchmarks) comes from `time_calls` (one callable) or `time_interleaved` (several, round-robin:
every round runs each in turn, once or a block of calls, so that load from other processes hits all of
them alike). On a shared machine compare ratios taken in the same interleaved run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    runs: int
    p95_ms: float | None = None
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
    p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
    cpu = float(np.median(cpu_seconds) * 1e3) if cpu_seconds is not None and len(cpu_seconds) else None
    return LatencyStats(float(p50), float(p90), float(p99), float(ms.mean()), int(ms.size), float(p95), cpu)


def time_calls(
    fn: Callable[[], object],
    min_runs: int = 20,
    min_seconds: float = 1.0,
    max_runs: int = 20_000,
    warmup_seconds: float = 0.2,
) -> LatencyStats:
    """Call `fn` until both `min_runs` and `min_seconds` are reached (at most `max_runs`)."""
    return time_interleaved({"fn": fn}, min_runs, min_seconds, max_runs, warmup_seconds)["fn"]


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    min_runs: int = 20,
    min_seconds: float = 1.0,
    max_runs: int = 20_000,
    warmup_seconds: float = 0.2,
    warmup_runs: int = 5,
    block: int = 1,
) -> dict[str, LatencyStats]:
    """Time several callables round-robin: warm each up (at least `warmup_runs` calls and
    `warmup_seconds` in all), then rounds in which each one, in turn, is called `block` times in a row,
    until every one has `min_runs` calls and `min_seconds` have passed (at most `max_runs` calls each).
    block > 1 times each callable warm (a device runs one model: its caches hold that model) while load
    from other processes still hits all of them alike; block = 1 leaves every call's caches to the others."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if not fns:
        return {}
    warm_until = time.perf_counter() + warmup_seconds
    for i in range(10_000):
        for fn in fns.values():
            fn()
        if i + 1 >= warmup_runs and time.perf_counter() >= warm_until:
            break
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    end = time.perf_counter() + min_seconds
    calls = 0
    while calls < min_runs or (time.perf_counter() < end and calls < max_runs):
        for name, fn in fns.items():
            for _ in range(block):
                start, start_cpu = time.perf_counter(), time.thread_time()
                fn()
                cpu[name].append(time.thread_time() - start_cpu)
                times[name].append(time.perf_counter() - start)
        calls += block
    return {name: summarize(times[name], cpu[name]) for name in fns}
