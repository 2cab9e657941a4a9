"""Prometheus metrics of one agent, exposed at GET /metrics in the Prometheus text format.

The agent keeps its numbers as plain Python values under one lock (a few hundred ns per request);
prometheus-client renders them through a custom collector on its own registry (no global state). It is
imported at the first scrape, not at start-up, which keeps ~0.1-0.3 s of imports off the cold start.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator
from typing import Any

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # prometheus_client.exposition.CONTENT_TYPE_LATEST

_COUNTERS = {
    "swaps": "Hot swaps to a new active version",
    "swap_failures": "Swaps abandoned because the new version failed",
    "fallbacks": "Start-up fallbacks to a last known good version",
}


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str], int] = {}
        self._errors: dict[tuple[str, str], int] = {}
        self._buckets: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}
        self._active: dict[str, int] = {}
        self._counters: dict[str, dict[str, int]] = {name: {} for name in _COUNTERS}
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self._registry: Any = None

    # ------------------------------------------------------------------------------------------ recording

    def observe(self, model: str, status: int, seconds: float, error_code: str | None = None) -> None:
        """One predict request (hot path)."""
        key = (model, str(status))
        with self._lock:
            self._requests[key] = self._requests.get(key, 0) + 1
            if error_code is not None:
                ekey = (model, error_code)
                self._errors[ekey] = self._errors.get(ekey, 0) + 1
                return
            counts = self._buckets.get(model)
            if counts is None:
                counts = self._buckets[model] = [0] * (len(LATENCY_BUCKETS) + 1)
                self._sums[model] = 0.0
            counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self._sums[model] += seconds

    def set_active(self, model: str, version: int) -> None:
        with self._lock:
            self._active[model] = version

    def count(self, name: str, model: str) -> None:
        """Increment one of the event counters (swaps, swap_failures, fallbacks) for `model`."""
        with self._lock:
            per_model = self._counters[name]
            per_model[model] = per_model.get(model, 0) + 1

    def add_gauge(self, name: str, doc: str, fn: Callable[[], float]) -> None:
        """A gauge read at scrape time."""
        self._gauges[name] = (doc, fn)

    # ------------------------------------------------------------------------------------------ export

    def render(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        if self._registry is None:
            registry = CollectorRegistry()
            registry.register(_Collector(self))
            self._registry = registry
        return generate_latest(self._registry)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        with self._lock:
            requests, errors, active = dict(self._requests), dict(self._errors), dict(self._active)
            buckets = {m: list(c) for m, c in self._buckets.items()}
            sums = dict(self._sums)
            counters = {n: dict(c) for n, c in self._counters.items()}
        fam = CounterMetricFamily("pocketfleet_agent_requests", "Predict requests by model and HTTP status", labels=["model", "status"])
        for labels, n in sorted(requests.items()):
            fam.add_metric(list(labels), n)
        yield fam
        fam = CounterMetricFamily("pocketfleet_agent_errors", "Failed predict requests by model and error code", labels=["model", "code"])
        for labels, n in sorted(errors.items()):
            fam.add_metric(list(labels), n)
        yield fam
        hist = HistogramMetricFamily(
            "pocketfleet_agent_request_seconds", "Predict latency inside the agent (decode, run, encode)", labels=["model"]
        )
        for model, counts in sorted(buckets.items()):
            running, cumulative = 0, []
            for bound, n in zip((*map(repr, LATENCY_BUCKETS), "+Inf"), counts, strict=True):
                running += n
                cumulative.append((bound, running))
            hist.add_metric([model], cumulative, sums[model])
        yield hist
        gauge = GaugeMetricFamily("pocketfleet_agent_active_version", "Version of each model being served", labels=["model"])
        for model, version in sorted(active.items()):
            gauge.add_metric([model], version)
        yield gauge
        for name, doc in _COUNTERS.items():
            fam = CounterMetricFamily(f"pocketfleet_agent_{name}", doc, labels=["model"])
            for model, n in sorted(counters[name].items()):
                fam.add_metric([model], n)
            yield fam
        for name, (doc, fn) in sorted(self._gauges.items()):
            yield GaugeMetricFamily(name, doc, value=fn())


class _Collector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        return self.metrics.collect()
