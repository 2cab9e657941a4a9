"""Serving traffic for the simulated fleet: each device answers requests with the model its store has
active, and reports through the agent's own telemetry (edge_agent.telemetry) into its own durable outbox,
drained to the cloud through its DeviceLink's MQTT sink. Used by Fleet(traffic=...), the operations tests and
benchmarks/fleet_scale.py.

Requests are rows of scikit-learn's digits, run through the real runtime (onnxruntime) of the installed
version. A package may ask the simulator for faults in its manifest's `extra.sim` (fault injection for
tests and demos only; a real agent ignores the field):

    {"service_ms": 2.0,      # extra service time per request (a slower model: 3x service_ms)
     "error_rate": 0.1,      # share of requests that fail (recorded as error "sim_fault")
     "input_shift": 0.5}     # added to every input value (drifted inputs)
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("pocketfleet.fleet.traffic")


@dataclass
class TrafficSettings:
    rate_hz: float = 5.0  # requests per second per device
    telemetry_interval_s: float = 1.0
    drain_interval_s: float = 0.5
    input_shift: float = 0.0  # added to the inputs of every device (drift), on top of a package's own
    fold_s: float = 0.25  # how often the telemetry thread folds observations into the window


class DeviceTraffic:
    """One device's request loop + telemetry loop (two threads)."""

    def __init__(self, device: str, store: Any, state_dir: str | Path, settings: TrafficSettings,
                 inputs: Any, seed: int = 0) -> None:
        from edge_agent.outbox import Outbox
        from edge_agent.telemetry import Telemetry, TelemetryLoop

        self.device, self.store, self.settings = device, store, settings
        self.outbox = Outbox(Path(state_dir) / "outbox.sqlite")
        self.telemetry = Telemetry(device, self.outbox, max_features=64)
        self._loop = TelemetryLoop(self.telemetry, settings.telemetry_interval_s, fold_s=settings.fold_s)
        self.inputs = inputs
        self.rng = random.Random(seed)
        self.served = 0
        self._model: Any = None
        self._stamp: Any = None
        self._drainer: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{device}-traffic", daemon=True)

    def _current(self) -> Any:
        stamp = self.store.state_stamp()
        if stamp != self._stamp or self._model is None:
            self._stamp = stamp
            models = self.store.read_state()
            name = sorted(n for n, m in models.items() if m.active is not None)
            if not name:
                self._model = None
                return None
            version = models[name[0]].active
            if self._model is None or (self._model.name, self._model.version) != (name[0], version):
                self._model = self.store.load(name[0], version)
        return self._model

    def _run(self) -> None:
        period = 1.0 / self.settings.rate_hz
        next_at = time.monotonic() + self.rng.random() * period
        while not self._stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return
            next_at = max(next_at + period, time.monotonic() - period)
            self.serve_once()

    def serve_once(self) -> None:
        """Answer one request with the active version and record it in the telemetry."""
        try:
            model = self._current()
        except Exception as exc:  # noqa: BLE001 - a version that does not load serves nothing
            log.debug("%s: no model to serve: %s", self.device, exc)
            return
        if model is None:
            return
        sim = model.manifest.extra.get("sim") or {}
        x = self.inputs[self.rng.randrange(len(self.inputs))][None, :] + (
            float(sim.get("input_shift", 0.0)) + self.settings.input_shift)
        start = time.perf_counter()
        error = None
        try:
            model.runtime.run({model.manifest.inputs[0].name: x.astype("float32")})
            if sim.get("service_ms"):
                time.sleep(float(sim["service_ms"]) / 1000.0)
            if self.rng.random() < float(sim.get("error_rate", 0.0)):
                error = "sim_fault"
        except Exception as exc:  # noqa: BLE001 - counted as the request's error
            error = type(exc).__name__
        self.telemetry.observe(model.name, model.version, time.perf_counter() - start,
                               None if error else {"image": x}, error)
        self.served += 1

    def start(self, sink: Any) -> DeviceTraffic:
        """Start serving; the outbox drains through `sink` (the DeviceLink's MqttSink)."""
        from edge_agent.outbox import Drainer

        self._drainer = Drainer(self.outbox, sink, interval_s=self.settings.drain_interval_s).start()
        self._loop.start()
        self._thread.start()
        return self

    def pooled(self, sink: Any) -> DeviceTraffic:
        """Prepare for a TrafficPool (which runs the requests, telemetry and drains; no threads of its own)."""
        from edge_agent.outbox import Drainer

        self._drainer = Drainer(self.outbox, sink, interval_s=self.settings.drain_interval_s)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._loop.stop(flush=False)
        if self._drainer is not None:
            self._drainer.stop()
        self.outbox.close()


class TrafficPool:
    """The traffic of many devices on two threads (requests + telemetry folds and flushes; outbox drains),
    for a simulator running hundreds of serving devices in one process: five threads per device (requests,
    telemetry, drain, MQTT, OTA) did not fit 1,000 serving devices on two cores. Each device keeps its own
    telemetry, outbox and MQTT sink; only the scheduling is shared."""

    def __init__(self, settings: TrafficSettings) -> None:
        self.settings = settings
        self.members: list[DeviceTraffic] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._serve, name="traffic-pool", daemon=True),
                         threading.Thread(target=self._drain, name="traffic-drain", daemon=True)]

    def add(self, traffic: DeviceTraffic, sink: Any) -> DeviceTraffic:
        self.members.append(traffic.pooled(sink))
        return traffic

    @property
    def served(self) -> int:
        return sum(m.served for m in self.members)

    def start(self) -> TrafficPool:
        for t in self._threads:
            t.start()
        return self

    def _serve(self) -> None:
        s = self.settings
        period = 1.0 / s.rate_hz
        now = time.monotonic()
        due = [now + m.rng.random() * period for m in self.members]
        next_fold, next_flush = now + s.fold_s, now + s.telemetry_interval_s
        while not self._stop.is_set():
            now = time.monotonic()
            for k, m in enumerate(self.members):
                if now >= due[k]:
                    due[k] = max(due[k] + period, now - period)
                    m.serve_once()
            now = time.monotonic()
            if now >= next_fold:
                flush = now >= next_flush
                for m in self.members:
                    try:
                        m.telemetry.fold()
                        if flush:
                            m.telemetry.flush()
                    except Exception:  # noqa: BLE001
                        log.exception("%s: telemetry error", m.device)
                next_fold = now + s.fold_s
                if flush:
                    next_flush = now + s.telemetry_interval_s
            wait = min([*due, next_fold]) - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)

    def _drain(self) -> None:
        while not self._stop.is_set():
            for m in self.members:
                with contextlib.suppress(Exception):  # records stay queued; the next round retries
                    m._drainer.drain_once()
            self._stop.wait(self.settings.drain_interval_s)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)
        for m in self.members:
            m.outbox.close()


def digits_inputs() -> Any:
    import numpy as np
    from sklearn.datasets import load_digits

    return (load_digits().data / 16.0).astype(np.float32)
