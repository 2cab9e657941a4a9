"""The cloud worker: fleet registry updates, artifact (chunk) service and the rollout controller.

`pocketfleet cloud run --config cloud.toml` runs one worker. Several workers may run against the same
state directory and broker: each subscribes to the device topics through an MQTT 5 shared subscription
(`$share/<shared_group>/pf/v1/dev/+/<leaf>`), so the broker spreads device messages over them; the
rollout controller runs in whichever worker holds the SQLite lease.

cloud.toml:

    [cloud]
    state_dir = "cloud-state"          # registry.sqlite, artifacts/, mosquitto/
    worker_id = "cloud-1"              # MQTT client id (with mosquitto: also the username)
    trust = "keys/pocketfleet.pub"     # releases must verify against these keys
    shared_group = "pfcloud"           # "" = plain subscriptions (single worker, MQTT 3.1.1 brokers)
    auto_register = false              # accept devices that announce a group without being provisioned
    again_min_s = 2.0                  # chunk requests: an `again` repeat of a chunk at most once per 2 s
    device_rate_bps = 4194304          # ... and at most this many chunk bytes per second per device
    multicast_min = 2                  # a chunk asked for by this many devices of a group at once is sent once
                                       # on the group's multicast topic (0 = unicast only)
    batch_wait_s = 1.0                 # the chunk service gathers requests this long to find shared chunks
    [mqtt]                             # cloud_sync.config.MqttConfig
    [rollout]                          # cloud_sync.rollout.RolloutConfig
    [broker]                           # files `cloud provision` maintains, and the broker to reload
    [devices]                          # what `cloud provision` writes into agent configs
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud_sync.client import Message, MqttClient
from cloud_sync.config import MqttConfig, from_table, load_toml
from cloud_sync.console.settings import ConsoleSettings
from cloud_sync.errors import ConfigError, ProtocolError
from cloud_sync.protocol import (
    FRAME_CHUNK,
    FRAME_INDEX,
    MAX_REQUEST_IDX,
    decode,
    dev_filter,
    dev_topic,
    encode_frame,
    multicast_topic,
    parse_dev_topic,
    valid_id,
)
from cloud_sync.registry import Registry, Release
from cloud_sync.rollout import RolloutConfig, RolloutController
from cloud_sync.telemetry_rollup import Rollups, RollupSettings
from pocketfleet.fs import atomic_write_json

log = logging.getLogger("pocketfleet.cloud")

LEASE = "rollout-controller"


@dataclass
class CloudSettings:
    state_dir: str = "cloud-state"
    worker_id: str = "cloud-1"
    trust: str = ""
    shared_group: str = "pfcloud"
    auto_register: bool = False
    chunk_inflight: int = 256
    chunk_ttl_s: int = 600
    recent_s: float = 30.0  # a plain repeat of a request for a chunk sent this recently is a redelivery
    again_min_s: float = 2.0  # a chunk asked for `again` is sent to a device at most once per this many seconds
    device_rate_bps: int = 4 << 20  # chunk bytes per second per device (token bucket holding 4 s); 0 = no limit
    multicast_min: int = 2  # devices of one group asking for a chunk in one batch that make it one multicast
    batch_wait_s: float = 1.0  # requests gathered per batch of the chunk service (with multicast on)
    lease_s: float = 5.0

    def check(self, where: str) -> None:
        if not valid_id(self.worker_id):
            raise ConfigError(f"{where}: worker_id {self.worker_id!r} must be a plain id ([A-Za-z0-9_.-])")
        if self.shared_group and not valid_id(self.shared_group):
            raise ConfigError(f"{where}: shared_group {self.shared_group!r} must be a plain id")
        if self.multicast_min < 0 or not 0 <= self.batch_wait_s <= 5:
            raise ConfigError(f"{where}: multicast_min must be >= 0 and batch_wait_s in [0, 5]")


@dataclass
class BrokerSettings:
    passwd_file: str = ""
    acl_file: str = ""
    dynsec_file: str = ""  # mosquitto's dynamic-security plugin file (default: beside the ACL, in dynsec/)
    pid_file: str = ""


@dataclass
class DeviceDefaults:
    """The broker address and CA as devices see them (written into provisioned agent configs)."""

    mqtt_host: str = ""
    mqtt_port: int = 0
    tls_ca: str = ""
    trust: str = ""


@dataclass
class CloudConfig:
    cloud: CloudSettings = field(default_factory=CloudSettings)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    devices: DeviceDefaults = field(default_factory=DeviceDefaults)
    telemetry: RollupSettings = field(default_factory=RollupSettings)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)
    path: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path | None = None, where: str = "cloud.toml") -> CloudConfig:
        known = ("cloud", "mqtt", "rollout", "broker", "devices", "telemetry", "console")
        for key in data:
            if key not in known:
                raise ConfigError(f"{where}: unknown table [{key}] (known: {', '.join(known)})")
        cfg = cls(
            cloud=from_table(CloudSettings, data.get("cloud"), f"{where} [cloud]", base),
            mqtt=from_table(MqttConfig, data.get("mqtt"), f"{where} [mqtt]", base),
            rollout=from_table(RolloutConfig, data.get("rollout"), f"{where} [rollout]", base),
            broker=from_table(BrokerSettings, data.get("broker"), f"{where} [broker]", base),
            devices=from_table(DeviceDefaults, data.get("devices"), f"{where} [devices]", base),
            telemetry=from_table(RollupSettings, data.get("telemetry"), f"{where} [telemetry]", base),
            console=from_table(ConsoleSettings, data.get("console"), f"{where} [console]", base),
        )
        if base is not None and not Path(cfg.cloud.state_dir).is_absolute():
            cfg.cloud.state_dir = str(base / cfg.cloud.state_dir)
        if not cfg.mqtt.client_id:
            cfg.mqtt.client_id = cfg.cloud.worker_id
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> CloudConfig:
        path = Path(path)
        cfg = cls.from_dict(load_toml(path), base=path.resolve().parent, where=str(path))
        cfg.path = str(path)
        return cfg

    @property
    def state_dir(self) -> Path:
        return Path(self.cloud.state_dir)

    @property
    def registry_path(self) -> Path:
        return self.state_dir / "registry.sqlite"

    @property
    def artifacts_dir(self) -> Path:
        return self.state_dir / "artifacts"

    def open_registry(self) -> Registry:
        return Registry(self.registry_path)


class _Artifacts:
    """Open packages and their indexes, kept for the chunk requests of one worker (LRU of file handles)."""

    def __init__(self, registry: Registry, size: int = 16) -> None:
        self.registry = registry
        self.size = size
        self._open: OrderedDict[str, tuple[Release, int, bytes, list[int], list[int]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, release_id: str) -> tuple[Release, int, bytes, list[int], list[int]] | None:
        from cloud_sync.chunks import ChunkIndex

        with self._lock:
            hit = self._open.get(release_id)
            if hit is not None:
                self._open.move_to_end(release_id)
                return hit
        rel = self.registry.release(release_id)
        if rel is None:
            return None
        index_raw = Path(rel.index_path).read_bytes()
        index = ChunkIndex.from_bytes(index_raw)
        fd = os.open(rel.package_path, os.O_RDONLY)
        entry = (rel, fd, index_raw, list(index.offsets), list(index.sizes))
        with self._lock:
            self._open[release_id] = entry
            while len(self._open) > self.size:
                _, old = self._open.popitem(last=False)
                os.close(old[1])
        return entry

    def close(self) -> None:
        with self._lock:
            for entry in self._open.values():
                os.close(entry[1])
            self._open.clear()


class Cloud:
    """One cloud worker. `start()` returns once its threads run; `stop()` ends them."""

    def __init__(self, config: CloudConfig) -> None:
        self.config = config
        self.registry = config.open_registry()
        self.config.artifacts_dir.mkdir(parents=True, exist_ok=True)
        self.controller = RolloutController(self.registry, self._send_cmd, config.rollout)
        self.client = MqttClient(config.mqtt, client_id=config.cloud.worker_id, name=config.cloud.worker_id,
                                 manual_ack=True)
        self.counters = self.client.counters
        self.rollups = Rollups(self.registry, config.telemetry)
        self.console: Any = None
        self._artifacts = _Artifacts(self.registry)
        self._allowed: dict[tuple[str, str], str] = {}  # (device, release) -> the group of its rollout
        self._requests: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
        self._queued: set[tuple[str, str, int]] = set()  # chunks waiting to be sent: repeats are dropped
        self._recent: dict[tuple[str, str, int], float] = {}  # chunks sent lately (request redeliveries)
        self._queued_lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # device -> (tokens in bytes, monotonic time)
        self._telemetry: queue.Queue[tuple[str, dict[str, Any], Message]] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.is_leader = False
        # tests may wrap this to corrupt what is sent (fault injection); signature (release_id, idx, data)
        self.chunk_filter: Callable[[str, int, bytes], bytes] | None = None
        share = config.cloud.shared_group or None
        # presence is not shared: every worker keeps it (idempotent writes) and, unlike a shared
        # subscription, a plain one receives the retained statuses, so a restarted cloud knows who is online
        self.client.subscribe(dev_filter("status"), self._on_status, qos=1)
        for leaf, handler in (("ota", self._on_report), ("req", self._on_request)):
            self.client.subscribe(dev_filter(leaf, share), handler, qos=1)
        # telemetry is committed in batches (one fsync for many records) and acknowledged after the commit
        self.client.subscribe(dev_filter("telemetry", share), self._on_telemetry, qos=1, acks_itself=True)

    def subscribe_device_leaf(self, leaf: str, handler: Callable[[str, Message], None]) -> None:
        """Route pf/v1/dev/+/<leaf> (shared) to handler(device, message); for plug-ins such as FL."""
        def route(msg: Message) -> None:
            device, _ = parse_dev_topic(msg.topic)
            handler(device, msg)

        self.client.subscribe(dev_filter(leaf, self.config.cloud.shared_group or None), route, qos=1)

    # ------------------------------------------------------------------------------------------ lifecycle

    @property
    def counters_path(self) -> Path:
        return self.config.state_dir / "workers" / f"{self.config.cloud.worker_id}.json"

    def write_counters(self) -> None:
        """Save this worker's counters (received, malformed, dead letters, ...) for `pocketfleet cloud counters`."""
        doc = {"worker": self.config.cloud.worker_id, "pid": os.getpid(), "ts": time.time(),
               "connected": self.client.connected, "leader": self.is_leader, "counters": self.counters()}
        atomic_write_json(self.counters_path, doc)

    def start(self, wait_s: float | None = 10.0) -> Cloud:
        """Connect and start the threads; with wait_s=None it does not wait for the broker (it keeps trying)."""
        self.client.start()
        if wait_s is not None:
            self.client.wait_connected(wait_s)
        for target, name in ((self._serve_chunks, "chunks"), (self._control_loop, "controller"),
                             (self._write_telemetry, "telemetry")):
            t = threading.Thread(target=target, name=f"{self.config.cloud.worker_id}-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.config.console.listen:
            from cloud_sync.console.server import ConsoleServer

            self.console = ConsoleServer(self, self.config.console).start()
        log.info("cloud worker %s running (state %s)", self.config.cloud.worker_id, self.config.state_dir)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.console is not None:
            self.console.stop()
            self.console = None
        self._requests.put(None)
        for t in self._threads:
            t.join(10)
        if self.is_leader:
            self.registry.release_lease(LEASE, self.config.cloud.worker_id)
        with contextlib.suppress(OSError):
            self.write_counters()
        log.info("worker %s counters: %s", self.config.cloud.worker_id, json.dumps(self.counters(), sort_keys=True))
        self.client.stop()
        self._artifacts.close()
        self.registry.close()

    def retire(self, idle_s: float = 3.0, timeout_s: float = 600.0) -> None:
        """Leave the worker pool for good: take what the broker queued for this worker's session, stop taking
        a share of new messages (unsubscribe the shared filters), finish, and stop.

        mosquitto keeps queueing a share of shared-subscription messages for a member whose session is
        persistent but offline (that is what lets a killed worker resume); a worker that will never come
        back must be retired this way, or its share waits until its session expires.
        """
        share = self.config.cloud.shared_group
        deadline = time.monotonic() + timeout_s
        last, quiet_since = -1, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - quiet_since < idle_s:
            now = self.counters.get("received")
            if now != last:
                last, quiet_since = now, time.monotonic()
            time.sleep(0.2)
        if share:
            for leaf in ("ota", "req", "telemetry"):
                self.client.unsubscribe(dev_filter(leaf, share))
        time.sleep(idle_s)  # what was already in flight to us
        while not self._requests.empty() or not self._telemetry.empty():
            time.sleep(0.2)
        log.info("worker %s retired", self.config.cloud.worker_id)
        self.stop()

    def run_forever(self) -> None:
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    # ----------------------------------------------------------------------------------------- handlers

    def _device_msg(self, msg: Message, leaf_schema: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
        device, _ = parse_dev_topic(msg.topic)
        body = decode(msg.payload, leaf_schema)
        if "device" in body and body["device"] != device:
            raise ProtocolError(f"message on {msg.topic} claims to be from {body['device']!r}")
        return device, body

    def _on_status(self, msg: Message) -> None:
        device, body = self._device_msg(msg, ("pf.status/1",))
        group = body.get("group") if self.config.cloud.auto_register else None
        if not self.registry.record_status(device, body, group):
            self.counters.add("unknown_device")
            log.warning("status from unprovisioned device %s ignored", device)

    def _on_report(self, msg: Message) -> None:
        device, body = self._device_msg(msg, ("pf.ota.report/1",))
        self.registry.record_report(device, body)

    def _on_telemetry(self, msg: Message) -> None:
        device, body = self._device_msg(msg, ("pf.outbox/1",))
        self._telemetry.put((device, body, msg))

    def _write_telemetry(self) -> None:
        """Group commit: up to 500 records or 20 ms per transaction, then the PUBACKs."""
        while not self._stop.is_set():
            try:
                batch = [self._telemetry.get(timeout=0.5)]
            except queue.Empty:
                continue
            deadline = time.monotonic() + 0.02
            while len(batch) < 500:
                try:
                    batch.append(self._telemetry.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            new = self._commit_telemetry(batch)
            if new is None:
                return
            self.counters.add("telemetry_stored", new)
            try:
                self.rollups.prune()
            except Exception:  # noqa: BLE001 - retention is retried on the next batch
                log.exception("telemetry retention failed")
            for _, _, msg in batch:
                self.client.ack(msg)

    def _commit_telemetry(self, batch: list[tuple[str, dict[str, Any], Message]]) -> int | None:
        """Store a batch; returns how many records were new (None: stopping with the batch unacknowledged).

        A batch that fails is committed one record at a time: a record SQLite refuses for what it holds
        (a poison message: it passed validation, it can never be stored) is set aside in the dead-letter
        table, counted and logged, and then acknowledged like the others, so it is never redelivered.
        Only an operational error (database locked, disk full) is retried, since it can pass.
        """
        while not self._stop.is_set():
            try:
                new = self.registry.add_telemetry_batch([(d, b) for d, b, _ in batch], on_new=self.rollups.fold)
                self.counters.add("telemetry_duplicates", len(batch) - new)
                return new
            except sqlite3.OperationalError:
                log.exception("telemetry commit failed; retrying")
                self._stop.wait(1.0)
                continue
            except Exception:  # noqa: BLE001 - one of the records is poison: find it below
                break
        else:
            return None
        new = 0
        for device, body, msg in batch:
            while not self._stop.is_set():
                try:
                    added = self.registry.add_telemetry_batch([(device, body)], on_new=self.rollups.fold)
                    new += added
                    self.counters.add("telemetry_duplicates", 1 - added)
                    break
                except sqlite3.OperationalError:
                    log.exception("telemetry commit failed; retrying")
                    self._stop.wait(1.0)
                except Exception as exc:  # noqa: BLE001 - poison: dead-letter, count, log, acknowledge
                    self._dead_letter(msg, device, f"{type(exc).__name__}: {exc}")
                    break
            else:
                return None
        return new

    def _dead_letter(self, msg: Message, device: str | None, error: str) -> None:
        self.counters.add(f"{parse_dev_topic(msg.topic)[1]}_dead_letter")
        log.warning("message on %s from %s cannot be stored (%s); set aside in dead_letters", msg.topic, device, error)
        try:
            self.registry.add_dead_letter(msg.topic, device, msg.payload, error)
        except Exception:  # noqa: BLE001 - counted and logged above; the message is still acknowledged
            self.counters.add("dead_letter_errors")
            log.exception("could not record the dead letter from %s", device)

    def _on_request(self, msg: Message) -> None:
        """Queue the chunks a device asks for, each at most once: repeats within a request, chunks already
        queued, plain repeats of chunks sent within `recent_s` (redeliveries) and `again` repeats within
        `again_min_s` are dropped and counted (a device cannot make the cloud send one chunk many times)."""
        device, body = self._device_msg(msg, ("pf.chunk.request/1",))
        rid = body["release_id"]
        now = time.monotonic()
        cfg = self.config.cloud
        gap = cfg.again_min_s if body.get("again") else cfg.recent_s
        asked = list(dict.fromkeys(body["idx"][:MAX_REQUEST_IDX]))
        with self._queued_lock:
            fresh = [i for i in asked if (device, rid, i) not in self._queued
                     and now - self._recent.get((device, rid, i), -gap) >= gap]
            self._queued.update((device, rid, i) for i in fresh)
            if len(self._recent) > 100_000:
                self._recent = {k: t for k, t in self._recent.items() if now - t < max(cfg.recent_s, cfg.again_min_s)}
        if len(fresh) < len(body["idx"]):
            self.counters.add("duplicate_requests", len(body["idx"]) - len(fresh))
        if fresh or body.get("index"):
            self._requests.put((device, {**body, "idx": fresh}))

    def _take(self, device: str, nbytes: int) -> bool:
        """Per-device token bucket over chunk bytes: False (the chunk is not sent) when the device is over its rate."""
        rate = self.config.cloud.device_rate_bps
        if rate <= 0:
            return True
        now = time.monotonic()
        tokens, last = self._buckets.get(device, (4.0 * rate, now))
        tokens = min(4.0 * rate, tokens + (now - last) * rate)
        if tokens < nbytes:
            self._buckets[device] = (tokens, now)
            return False
        self._buckets[device] = (tokens - nbytes, now)
        return True

    # ------------------------------------------------------------------------------------ chunk service

    def _serve_chunks(self) -> None:
        """Serve chunk requests in batches: what several devices of a group ask for in one batch goes out once."""
        wait = self.config.cloud.batch_wait_s if self.config.cloud.multicast_min else 0.0
        while not self._stop.is_set():
            item = self._requests.get()
            if item is None:
                return
            batch: list[tuple[str, dict[str, Any]]] = []
            last = False
            opened = time.monotonic()
            while True:
                if item[1].get("index") and not item[1]["idx"]:
                    self._serve_batch([item])  # a chunk index waits for no batch
                else:
                    batch.append(item)
                now = time.monotonic()
                # a batch closes `wait` after it opened, or after 0.2 s without a request, or at 4,096 requests
                left = min(opened + wait - now, 0.2) if batch else opened + wait - now
                if left <= 0 or len(batch) >= 4096:
                    break
                try:
                    nxt = self._requests.get(timeout=left)
                except queue.Empty:
                    break
                if nxt is None:
                    last = True
                    break
                item = nxt
            if batch:
                self._serve_batch(batch)
            if last:
                return

    def _serve_batch(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        sent: list[list[int]] = [[] for _ in batch]
        try:
            plan = self._plan(batch)
            for first in (True, False):  # chunk indexes first (a device needs one before any chunk), then chunks
                if not first:
                    self._multicast(batch, plan, sent)
                for k, (device, req) in enumerate(batch):
                    if plan[k] is None or plan[k]["index"] != first:  # type: ignore[index]
                        continue
                    try:
                        self._unicast(device, req, plan[k], sent[k])  # type: ignore[arg-type]
                    except Exception:  # noqa: BLE001 - a bad request must not stop the service
                        self.counters.add("request_errors")
                        log.exception("chunk request from %s failed", device)
        except Exception:  # noqa: BLE001
            self.counters.add("request_errors")
            log.exception("a batch of %d chunk requests failed", len(batch))
        finally:
            now = time.monotonic()
            with self._queued_lock:
                for (device, req), done in zip(batch, sent, strict=True):
                    for i in req["idx"]:
                        self._queued.discard((device, req["release_id"], i))
                    for i in done:
                        self._recent[(device, req["release_id"], i)] = now

    def _plan(self, batch: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any] | None]:
        """Per request: None (refused) or {entry, group, idx (chunks to send), index (send the index)}.
        Chunks a request may take by multicast (`mc` and not `again`) are listed under `shared` instead."""
        plan: list[dict[str, Any] | None] = []
        mc_on = self.config.cloud.multicast_min > 0
        for device, req in batch:
            try:
                rid = req["release_id"]
                group = self._allowed.get((device, rid))
                if group is None:
                    group = self.registry.device_release_group(device, rid)
                    if group is None:
                        self.counters.add("requests_refused")
                        log.warning("device %s asked for release %s, which is not assigned to it", device, rid)
                        plan.append(None)
                        continue
                    self._allowed[(device, rid)] = group
                entry = self._artifacts.get(rid)
                if entry is None:
                    self.counters.add("requests_refused")
                    plan.append(None)
                    continue
                sizes = entry[4]
                idx, limited = [], 0
                for i in req["idx"][:MAX_REQUEST_IDX]:
                    if i >= len(sizes):
                        self.counters.add("requests_refused")
                    elif self._take(device, sizes[i]):
                        idx.append(i)
                    else:
                        limited += 1
                if limited:
                    self.counters.add("chunks_rate_limited", limited)
                    log.warning("device %s is over its chunk rate (%d B/s): %d chunk(s) not sent", device,
                                self.config.cloud.device_rate_bps, limited)
                shared = mc_on and bool(req.get("mc")) and not req.get("again")
                plan.append({"entry": entry, "group": group, "index": bool(req.get("index")),
                             "idx": [] if shared else idx, "shared": idx if shared else []})
            except Exception:  # noqa: BLE001
                self.counters.add("request_errors")
                log.exception("chunk request from %s failed", device)
                plan.append(None)
        return plan

    def _multicast(self, batch: list[tuple[str, dict[str, Any]]], plan: list[dict[str, Any] | None],
                   sent: list[list[int]]) -> None:
        """A chunk of one release that `multicast_min` devices of one group ask for in this batch is published
        once on the group's multicast topic; the others go back to their devices' unicast lists."""
        wanted: dict[tuple[str, str, int], list[int]] = {}
        for k, p in enumerate(plan):
            if p is not None:
                for i in p["shared"]:
                    wanted.setdefault((p["group"], batch[k][1]["release_id"], i), []).append(k)
        cfg = self.config.cloud
        for (group, rid, i), ks in sorted(wanted.items()):
            if len({batch[k][0] for k in ks}) < cfg.multicast_min:
                for k in ks:
                    plan[k]["idx"].append(i)  # type: ignore[index]
                continue
            _, fd, _, offsets, sizes = plan[ks[0]]["entry"]  # type: ignore[index]
            data = os.pread(fd, sizes[i], offsets[i])
            if self.chunk_filter is not None:
                data = self.chunk_filter(rid, i, data)
            self.client.wait_capacity(cfg.chunk_inflight, timeout=30)
            self.client.publish(multicast_topic(group, rid), encode_frame(FRAME_CHUNK, rid, i, offsets[i], data),
                                qos=1, expiry_s=cfg.chunk_ttl_s)
            for k in ks:
                sent[k].append(i)
            self.counters.add("chunks_sent")
            self.counters.add("chunk_bytes_sent", len(data))
            self.counters.add("chunks_multicast")
            self.counters.add("chunk_bytes_multicast", len(data))
            self.counters.add("multicast_deliveries", len(ks))

    def _unicast(self, device: str, req: dict[str, Any], p: dict[str, Any], sent: list[int]) -> None:
        rid = req["release_id"]
        _, fd, index_raw, offsets, sizes = p["entry"]
        topic = dev_topic(device, "chunk")
        ttl = self.config.cloud.chunk_ttl_s
        if p["index"]:
            self.client.publish(topic, encode_frame(FRAME_INDEX, rid, 0, 0, index_raw), qos=1, expiry_s=ttl)
            p["index"] = False
            return  # its chunks (if it asked for any) go with the others, after the multicast
        for i in sorted(p["idx"]):
            data = os.pread(fd, sizes[i], offsets[i])
            if self.chunk_filter is not None:
                data = self.chunk_filter(rid, i, data)
            self.client.wait_capacity(self.config.cloud.chunk_inflight, timeout=30)
            self.client.publish(topic, encode_frame(FRAME_CHUNK, rid, i, offsets[i], data), qos=1, expiry_s=ttl)
            sent.append(i)
            self.counters.add("chunks_sent")
            self.counters.add("chunk_bytes_sent", len(data))

    # ---------------------------------------------------------------------------------------- controller

    def _send_cmd(self, device: str, payload: bytes, expiry_s: int) -> None:
        self.client.publish(dev_topic(device, "cmd"), payload, qos=1, expiry_s=expiry_s)

    def _control_loop(self) -> None:
        cfg = self.config
        saved = 0.0
        while not self._stop.is_set():
            if time.monotonic() - saved >= 2.0:
                saved = time.monotonic()
                try:
                    self.write_counters()
                except OSError:
                    log.exception("could not save the counters")
            try:
                self.is_leader = self.registry.try_lease(LEASE, cfg.cloud.worker_id, cfg.cloud.lease_s)
                if self.is_leader and self.client.connected:
                    self.controller.tick()
            except Exception:  # noqa: BLE001
                log.exception("controller tick failed")
            self._stop.wait(cfg.rollout.tick_s)


def run_cloud(config: CloudConfig, retire: bool = False) -> None:
    """Run one worker until SIGINT/SIGTERM (with `retire`: until it has drained its session, see Cloud.retire)."""
    import signal

    cloud = Cloud(config)
    if retire:
        cloud.start(wait_s=60)
        cloud.retire()
        return
    stop = threading.Event()

    def _stop(*_: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    cloud.start(wait_s=None)
    while not stop.wait(0.5):
        pass
    cloud.stop()


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    """Poll until predicate() is truthy; returns its value or raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout:g}s")
        time.sleep(interval)
