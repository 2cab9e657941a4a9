"""Per-model telemetry: request and error counts, latency p50/p95, and per-input running mean and variance
per feature (for drift), written to the outbox as one TELEMETRY record per model version per interval.

The request path only appends to a bounded deque (`observe`, ~1 us); a background thread folds the
observations into the window (batched NumPy: Welford/Chan merge of batch statistics), so the statistics
cost nothing on the latency path. Inputs with more than `max_features` values per sample are pooled into
`max_features` bins of consecutive values (the record says so).
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_agent.outbox import Outbox, Priority

log = logging.getLogger("pocketfleet.agent.telemetry")

SCHEMA = "pf.telemetry/1"
MAX_LATENCIES = 20_000  # per window; reservoir-sampled beyond


class RunningStats:
    """Per-feature count, mean and M2; batches merge exactly (Chan et al.), so windows can be combined."""

    def __init__(self, features: int) -> None:
        self.count = 0
        self.mean = np.zeros(features, np.float64)
        self.m2 = np.zeros(features, np.float64)

    def update(self, x: np.ndarray) -> None:
        n = x.shape[0]
        if n == 0:
            return
        mean_b = x.mean(axis=0)
        m2_b = ((x - mean_b) ** 2).sum(axis=0)
        total = self.count + n
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2_b + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def var(self) -> np.ndarray:
        return self.m2 / self.count if self.count else self.m2

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": np.round(self.mean, 6).tolist(), "var": np.round(self.var, 6).tolist()}


def features(arr: np.ndarray, max_features: int) -> tuple[np.ndarray, bool]:
    """(batch, F) float64 view of an input batch; F pooled to max_features bins when larger."""
    x = np.asarray(arr, dtype=np.float64)
    x = x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(-1, 1)
    if x.shape[1] <= max_features:
        return x, False
    starts = np.linspace(0, x.shape[1], max_features, endpoint=False).astype(np.int64)
    sizes = np.diff(np.append(starts, x.shape[1]))
    return np.add.reduceat(x, starts, axis=1) / sizes, True


@dataclass
class Window:
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    seen: int = 0
    inputs: dict[str, RunningStats] = field(default_factory=dict)
    pooled: dict[str, bool] = field(default_factory=dict)

    def add_latency(self, seconds: float) -> None:
        self.seen += 1
        if len(self.latencies) < MAX_LATENCIES:
            self.latencies.append(seconds)
        else:
            j = random.randrange(self.seen)
            if j < MAX_LATENCIES:
                self.latencies[j] = seconds


class Telemetry:
    """Collects observations from request threads; `flush()` writes one record per model version."""

    def __init__(
        self, device: str, outbox: Outbox | None = None, max_features: int = 256, max_pending: int = 8192,
        max_pending_bytes: int = 32 << 20,
    ) -> None:
        self.device, self.outbox, self.max_features = device, outbox, max_features
        self._pending: collections.deque = collections.deque(maxlen=max_pending)
        self._pending_bytes = 0  # input bytes held by pending observations (bounded: big bursts skip stats)
        self.max_pending_bytes = max_pending_bytes
        self.unsampled = 0  # requests of this window whose inputs were left out of the drift statistics
        self._windows: dict[tuple[str, int], Window] = {}
        self._lock = threading.Lock()
        self._bytes_lock = threading.Lock()
        self._since = time.time()

    def observe(self, name: str, version: int, seconds: float, inputs: Mapping[str, np.ndarray] | None, error: str | None) -> None:
        """Hot path: O(1), no NumPy work."""
        if inputs:
            size = sum(a.nbytes for a in inputs.values())
            with self._bytes_lock:  # never the window lock: a fold in progress must not delay requests
                if self._pending_bytes + size > self.max_pending_bytes:
                    self.unsampled += 1
                    inputs = None
                else:
                    self._pending_bytes += size
        self._pending.append((name, version, seconds, inputs, error))

    def fold(self) -> None:
        """Move pending observations into the windows (batched statistics per input)."""
        batch = []
        while True:
            try:
                batch.append(self._pending.popleft())
            except IndexError:
                break
        if not batch:
            return
        with self._bytes_lock:
            self._pending_bytes = max(0, self._pending_bytes - sum(a.nbytes for b in batch if b[3] for a in b[3].values()))
        groups: dict[tuple[str, int, str], list[np.ndarray]] = collections.defaultdict(list)
        with self._lock:
            for name, version, seconds, inputs, error in batch:
                w = self._windows.setdefault((name, version), Window())
                w.requests += 1
                if error is not None:
                    w.errors[error] = w.errors.get(error, 0) + 1
                    continue
                w.add_latency(seconds)
                for iname, arr in (inputs or {}).items():
                    if arr.ndim and arr.dtype.kind in "biuf":
                        groups[(name, version, iname)].append(arr)
            for (name, version, iname), arrays in groups.items():
                w = self._windows[(name, version)]
                try:
                    x, pooled = features(np.concatenate(arrays, axis=0), self.max_features)
                except ValueError:  # shapes changed within the window (dynamic dims): fold one by one
                    for arr in arrays:
                        self._update(w, iname, arr)
                    continue
                self._add(w, iname, x, pooled)

    def _update(self, w: Window, iname: str, arr: np.ndarray) -> None:
        x, pooled = features(arr, self.max_features)
        self._add(w, iname, x, pooled)

    def _add(self, w: Window, iname: str, x: np.ndarray, pooled: bool) -> None:
        stats = w.inputs.get(iname)
        if stats is None or stats.mean.shape[0] != x.shape[1]:
            stats = w.inputs[iname] = RunningStats(x.shape[1])
        stats.update(x)
        w.pooled[iname] = pooled

    def snapshot(self, reset: bool = False) -> list[dict[str, Any]]:
        """The telemetry records of the current window (and start a new window when `reset`)."""
        self.fold()
        now = time.time()
        with self._lock, self._bytes_lock:
            windows, since, unsampled = self._windows, self._since, self.unsampled
            if reset:
                self._windows, self._since, self.unsampled = {}, now, 0
        records = []
        for (name, version), w in sorted(windows.items()):
            lat = np.asarray(w.latencies) * 1000.0
            records.append(
                {
                    "schema": SCHEMA,
                    "device": self.device,
                    "model": {"name": name, "version": version},
                    "window": {"start": since, "end": now},
                    "requests": w.requests,
                    "errors": dict(w.errors),
                    "error_count": sum(w.errors.values()),
                    "latency_ms": {
                        "p50": float(np.percentile(lat, 50)) if lat.size else None,
                        "p95": float(np.percentile(lat, 95)) if lat.size else None,
                        "max": float(lat.max()) if lat.size else None,
                    },
                    "inputs": {k: {**s.to_dict(), "pooled": w.pooled.get(k, False)} for k, s in w.inputs.items()},
                    "unsampled": unsampled,  # requests (all models) left out of the input statistics
                }
            )
        return records

    def flush(self) -> int:
        """Write the window's records to the outbox and start a new window; returns records written."""
        records = self.snapshot(reset=True)
        if self.outbox is None:
            return 0
        written = 0
        for rec in records:
            try:
                if self.outbox.put("telemetry", rec, Priority.TELEMETRY) is not None:
                    written += 1
            except Exception as exc:  # telemetry must never take the agent down
                log.warning("telemetry record not written: %s", exc)
        return written


class TelemetryLoop:
    """Background thread: fold every `fold_s`, flush every `interval_s`."""

    def __init__(self, telemetry: Telemetry, interval_s: float, fold_s: float = 0.25) -> None:
        self.telemetry, self.interval_s, self.fold_s = telemetry, interval_s, fold_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)

    def _run(self) -> None:
        next_flush = time.monotonic() + self.interval_s
        while not self._stop.wait(self.fold_s):
            try:
                self.telemetry.fold()
                if time.monotonic() >= next_flush:
                    self.telemetry.flush()
                    next_flush = time.monotonic() + self.interval_s
            except Exception:
                log.exception("telemetry loop error")

    def start(self) -> TelemetryLoop:
        self._thread.start()
        return self

    def stop(self, flush: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if flush:
            self.telemetry.flush()
