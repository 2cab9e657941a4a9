"""The agent daemon: recovers the store, serves the local API, hot-swaps versions, writes telemetry.

Hot swap: the served models live in a dict that is replaced, never mutated (copy-on-write). A request
looks its model up once and keeps that ServedModel to the end, so requests already running finish on the
old version while new ones go to the new version; the old runtime is freed when its last request ends.
The new version is verified, loaded and warmed (health check on its samples) before the switch, so no
request ever waits for a load or sees a failure.

The agent notices a new active version in state.json (written by `pocketfleet agent install`, the sync
client, or `rollback`) by polling its inode/mtime every `watch_interval_s`, on SIGHUP, or on
POST /v1/reload.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from edge_agent.api import Api
from edge_agent.config import AgentConfig
from edge_agent.errors import AgentError, RequestError, StoreError
from edge_agent.health import ServedModel
from edge_agent.httpd import HttpServer
from edge_agent.metrics import Metrics
from edge_agent.outbox import Drainer, Outbox, Priority, make_sink
from edge_agent.store import ModelStore
from edge_agent.telemetry import Telemetry, TelemetryLoop
from pocketfleet import PocketfleetError
from pocketfleet.faults import fault_point
from pocketfleet.fs import atomic_write_json

log = logging.getLogger("pocketfleet.agent")

AGENT_FILE = "agent.json"  # pid and addresses of the running agent, for the CLI


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        config.check()
        self.config = config
        self.store = ModelStore(config.state_dir, config.trust or None, config.threads, keep=config.keep_versions)
        self.metrics = Metrics()
        self.outbox = Outbox(config.outbox_file, config.outbox_max_bytes)
        self.telemetry = Telemetry(config.device, self.outbox, config.drift_max_features)
        self._samples: Any = None
        self._samples_lock = threading.Lock()
        self.link: Any = None  # edge_agent.link.AgentLink when the config has an [mqtt] table
        self._models: dict[str, ServedModel] = {}
        self._swap_lock = threading.Lock()
        self._stop = threading.Event()
        self._stamp: tuple[int, int] | None = None
        self.swaps = 0
        self.started = time.time()
        self.server: HttpServer | None = None
        self._lock_fd: int | None = None
        self._threads: list[Any] = []
        self.metrics.add_gauge("pocketfleet_agent_outbox_bytes", "Bytes held in the outbox", lambda: self.outbox.stats()["bytes"])
        self.metrics.add_gauge(
            "pocketfleet_agent_outbox_dropped_records", "Telemetry records dropped because the outbox was full",
            lambda: self.outbox.stats()["dropped_records"],
        )

    # ------------------------------------------------------------------------------------------ models

    def model(self, name: str | None) -> ServedModel:
        """The model a request should use (one dict lookup: the request keeps this object)."""
        models = self._models
        if name is None:
            if len(models) == 1:
                return next(iter(models.values()))
            if not models:
                raise RequestError(503, "no_model", "no model is being served: install a package first")
            raise RequestError(400, "model_required", f"the agent serves {sorted(models)}: name the model (\"model\" or ?model=)")
        model = models.get(name)
        if model is None:
            raise RequestError(404, "unknown_model", f"unknown model {name!r}; the agent serves {sorted(models)}", model=name)
        return model

    def _publish(self, model: ServedModel) -> None:
        self._models = {**self._models, model.name: model}
        self.metrics.set_active(model.name, model.version)

    def _event(self, event: dict[str, Any]) -> None:
        routine = event.get("event") == "swap"  # failures, fallbacks and set-asides are warnings
        log.log(logging.INFO if routine else logging.WARNING, "%s", json.dumps(event, sort_keys=True))
        try:
            self.outbox.put("event", {"schema": "pf.agent.event/1", "device": self.config.device, **event}, Priority.EVENT)
        except PocketfleetError as exc:
            log.error("event not queued: %s", exc)

    # ------------------------------------------------------------------------------------------ swap

    def reload(self) -> dict[str, Any]:
        """Swap every model whose active version in state.json differs from the one served."""
        with self._swap_lock:
            self._stamp = self.store.state_stamp()
            try:
                wanted = {n: m.active for n, m in self.store.read_state().items() if m.active is not None}
            except StoreError as exc:
                log.error("state unreadable, keeping the served versions: %s", exc)
                return {"swapped": [], "error": str(exc), "models": self.served()}
            swapped, failed = [], []
            for name, version in sorted(wanted.items()):
                current = self._models.get(name)
                if current is not None and current.version == version:
                    continue
                try:
                    self._swap(name, version, current)
                    swapped.append({"model": name, "version": version, "previous": current.version if current else None})
                except PocketfleetError as exc:
                    failed.append({"model": name, "version": version, "error": str(exc)})
                    self._swap_failed(name, version, current, exc)
            return {"swapped": swapped, "failed": failed, "models": self.served()}

    def _swap(self, name: str, version: int, current: ServedModel | None) -> None:
        start = time.perf_counter()
        new = self.store.load(name, version)  # verify + load + health check (= warm-up), beside the old one
        fault_point("swap.after_load")
        self._publish(new)
        fault_point("swap.after_switch")
        self.swaps += 1
        self.metrics.count("swaps", name)
        self._event({"event": "swap", "model": name, "version": version, "previous": current.version if current else None,
                     "load_s": round(time.perf_counter() - start, 4)})

    def _swap_failed(self, name: str, version: int, current: ServedModel | None, exc: Exception) -> None:
        """The new version failed: set it aside, point state.json back at what is served, keep serving."""
        self.metrics.count("swap_failures", name)
        with contextlib.suppress(PocketfleetError, OSError), self.store.lock():
            self.store.quarantine(name, version, f"failed to load in the running agent: {exc}")
        if current is not None:  # unless something newer was activated meanwhile
            with contextlib.suppress(PocketfleetError, OSError):
                self.store.set_active(name, current.version, "swap-reverted", only_if=version, failed=version)
        self._stamp = self.store.state_stamp()
        self._event({"event": "swap-failed", "model": name, "version": version, "serving": current.version if current else None, "reason": str(exc)})

    def _watch(self) -> None:
        while not self._stop.wait(self.config.watch_interval_s):
            if self.store.state_stamp() != self._stamp:
                try:
                    self.reload()
                except Exception:
                    log.exception("reload failed")

    def install(self, package: str | Path, allow_downgrade: bool = False) -> dict[str, Any]:
        """Install into the store and swap at once (used in-process, e.g. by the sync client)."""
        result = self.store.install(package, allow_downgrade=allow_downgrade)
        return {**result.to_dict(), "reload": self.reload()}

    @property
    def samples(self) -> Any:
        """Labelled samples for on-device training (edge_agent.training.SampleStore, opened on first use)."""
        with self._samples_lock:  # not the swap lock: a swap in progress must not hold up samples
            if self._samples is None:
                from edge_agent.training import SampleStore

                self._samples = SampleStore(self.config.samples_file, max_samples=self.config.samples_max)
            return self._samples

    # ------------------------------------------------------------------------------------------ reports

    def served(self) -> dict[str, int]:
        return {n: m.version for n, m in sorted(self._models.items())}

    def health(self) -> dict[str, Any]:
        models = self._models
        return {
            "status": "ok" if models else "no_model",
            "device": self.config.device,
            "models": {n: m.ref for n, m in sorted(models.items())},
            "uptime_s": round(time.time() - self.started, 3),
            "swaps": self.swaps,
            "pid": os.getpid(),
            "mqtt": self._link_state(),
        }

    def _link_state(self) -> dict[str, Any] | None:
        """The cloud link (None when the config has no [mqtt] table)."""
        client = getattr(self.link, "client", None)
        return client.link_state() if client is not None else None

    def describe(self) -> dict[str, Any]:
        return {"models": [m.describe() for _, m in sorted(self._models.items())], "store": self.store.status()["models"]}

    # ------------------------------------------------------------------------------------------ lifecycle

    def _claim(self) -> None:
        """One agent per state directory: an exclusive flock held for the agent's life (freed on death)."""
        fd = os.open(self.store.root / "agent.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            other = running_agent(self.store.root) or {}
            raise AgentError(
                f"another agent (pid {other.get('pid', '?')}, {', '.join(other.get('urls', [])) or 'starting'}) "
                f"is running on {self.store.root}"
            ) from None
        self._lock_fd = fd

    def start(self) -> Agent:
        cfg = self.config
        self._claim()
        self._stamp = self.store.state_stamp()
        try:
            loaded = self.store.recover(on_event=self._on_store_event)
        except BaseException:  # e.g. an unusable trust setting: refuse to start, and free the state directory
            os.close(self._lock_fd)  # type: ignore[arg-type]
            self._lock_fd = None
            raise
        for model in loaded.values():
            self._publish(model)
        self._stamp = self.store.state_stamp()
        tcp = cfg.listen_address() if cfg.listen else None
        self.server = HttpServer(
            Api(self), tcp=tcp, unix_path=cfg.unix_socket or None, max_body=cfg.max_body_bytes,
            max_connections=cfg.max_connections, keepalive_s=cfg.keepalive_s,
            request_timeout_s=cfg.request_timeout_s,
        ).start()
        watcher = threading.Thread(target=self._watch, name="store-watch", daemon=True)
        watcher.start()
        self._threads = [TelemetryLoop(self.telemetry, cfg.telemetry_interval_s).start()]
        sink = make_sink(cfg.sink)
        if sink is not None:
            self._threads.append(Drainer(self.outbox, sink, cfg.drain_interval_s).start())
        if cfg.mqtt:  # the cloud link drains the outbox itself unless a local sink was configured
            from edge_agent.link import AgentLink

            self.link = AgentLink(self, drain=sink is None).start()
            self._threads.append(self.link)
            self.metrics.add_gauge("pocketfleet_agent_mqtt_connected", "1 while the MQTT link to the cloud is up",
                                   lambda: 1.0 if self.link.client.connected else 0.0)
            self.metrics.add_gauge("pocketfleet_agent_mqtt_connect_failures",
                                   "Attempts to reach the broker that failed (TCP/TLS) since start",
                                   lambda: float(self.link.client.counters.get("connect_failures")))
        atomic_write_json(self.store.root / AGENT_FILE, self.address_info())
        for name, m in sorted(self._models.items()):
            log.info("serving %s v%d (%s, loaded in %.3f s)", name, m.version, m.manifest.format, m.load_s)
        log.info("local API on %s", self.urls())
        return self

    def _on_store_event(self, event: dict[str, Any]) -> None:
        self.metrics.count("fallbacks", event.get("model", "-"))
        self._event(event)

    def urls(self) -> list[str]:
        out = []
        if self.server and self.server.address:
            host, port = self.server.address
            out.append(f"http://{'[' + host + ']' if ':' in host else host}:{port}")
        if self.config.unix_socket:
            out.append(f"unix:{self.config.unix_socket}")
        return out

    def address_info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "urls": self.urls(), "started": self.started}

    def stop(self) -> None:
        self._stop.set()
        if self.server:
            self.server.close()
        for t in self._threads:
            t.stop()
        with contextlib.suppress(OSError, ValueError):
            info = json.loads((self.store.root / AGENT_FILE).read_text())
            if info.get("pid") == os.getpid():
                (self.store.root / AGENT_FILE).unlink()
        self.outbox.close()
        if self._samples is not None:
            self._samples.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT (graceful: requests in progress finish); SIGHUP reloads."""
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=self.reload, daemon=True).start())
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()


def running_agent(state_dir: str | Path) -> dict[str, Any] | None:
    """agent.json of a live agent on this state directory, or None."""
    try:
        info = json.loads((Path(state_dir) / AGENT_FILE).read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info

