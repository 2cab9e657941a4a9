"""Prometheus metrics of one agent (its own registry: no global state), exposed at GET /metrics."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Counters, latency histogram and active-version gauge; label children are cached (hot path)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pocketfleet_agent_requests", "Predict requests by model and HTTP status", ["model", "status"], registry=r)
        self.errors = Counter("pocketfleet_agent_errors", "Failed predict requests by model and error code", ["model", "code"], registry=r)
        self.latency = Histogram(
            "pocketfleet_agent_request_seconds", "Predict latency inside the agent (decode, run, encode)", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.active = Gauge("pocketfleet_agent_active_version", "Version of each model being served", ["model"], registry=r)
        self.swaps = Counter("pocketfleet_agent_swaps", "Hot swaps to a new active version", ["model"], registry=r)
        self.swap_failures = Counter("pocketfleet_agent_swap_failures", "Swaps abandoned (the new version failed)", ["model"], registry=r)
        self.fallbacks = Counter("pocketfleet_agent_fallbacks", "Start-up fallbacks to a last known good version", ["model"], registry=r)
        self._children: dict[tuple, object] = {}

    def _child(self, metric: object, *labels: str) -> object:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)  # type: ignore[attr-defined]
        return child

    def observe(self, model: str, status: int, seconds: float, error_code: str | None = None) -> None:
        self._child(self.requests, model, str(status)).inc()  # type: ignore[attr-defined]
        if error_code is None:
            self._child(self.latency, model).observe(seconds)  # type: ignore[attr-defined]
        else:
            self._child(self.errors, model, error_code).inc()  # type: ignore[attr-defined]

    def add_gauge(self, name: str, doc: str, fn: Callable[[], float]) -> None:
        Gauge(name, doc, registry=self.registry).set_function(fn)

    def render(self) -> bytes:
        return generate_latest(self.registry)
