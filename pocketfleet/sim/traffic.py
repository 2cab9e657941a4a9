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
            try:
                model = self._current()
            except Exception as exc:  # noqa: BLE001 - a version that does not load serves nothing
                log.debug("%s: no model to serve: %s", self.device, exc)
                continue
            if model is None:
                continue
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

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._loop.stop(flush=False)
        if self._drainer is not None:
            self._drainer.stop()
        self.outbox.close()


def digits_inputs() -> Any:
    import numpy as np
    from sklearn.datasets import load_digits

    return (load_digits().data / 16.0).astype(np.float32)
