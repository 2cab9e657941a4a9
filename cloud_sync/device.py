"""A device's link to the cloud (torch-free): one MQTT connection carrying presence, OTA and the outbox.

    link = DeviceLink(DeviceConfig.from_agent(agent_config), store=model_store).start()
    Drainer(outbox, link.sink).start()   # the caller drains its outbox through link.sink
    ...
    link.stop()

- Presence: on every connect the device publishes a retained pf.status/1 (online, active versions, last
  OTA state, connection id); its last will is the same topic with online=false.
- OTA: cloud_sync.ota_client.OtaClient on the device's cmd and chunk topics.
- Outbox: `MqttSink` (a `ports.RecordSink`) carries the agent's durable outbox over this connection with
  QoS 1 and reports a record as delivered only after the broker's PUBACK; the agent's Drainer (which
  edge_agent.link starts) then deletes it.

Agent config ([mqtt] table, plus two optional entries read here):

    [mqtt]
    host = "127.0.0.1"
    port = 1883
    username = "dev-0001"
    password_file = "mqtt.password"
    group = "lab"                 # announced in the status (used by an open dev broker to register it)
    [mqtt.ota]                    # cloud_sync.ota_client.OtaSettings
    bandwidth_bps = 250000
"""

from __future__ import annotations

import base64
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud_sync.client import MqttClient, Will
from cloud_sync.config import MqttConfig, from_table
from cloud_sync.errors import ConfigError, ProtocolError
from cloud_sync.ota_client import OtaClient, OtaSettings
from cloud_sync.ports import ModelStoreLike, OutboxRecord
from cloud_sync.protocol import check_id, dev_topic, encode, valid_id

log = logging.getLogger("pocketfleet.device")

AGENT_VERSION = "pocketfleet-agent/0.1"


@dataclass
class DeviceConfig:
    device_id: str
    state_dir: str
    trust: str = ""
    group: str = ""
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    ota: OtaSettings = field(default_factory=OtaSettings)

    def __post_init__(self) -> None:
        check_id(self.device_id, "device id")
        if self.group and not valid_id(self.group):
            raise ConfigError(f"[mqtt] group {self.group!r} must be a plain id ([A-Za-z0-9_.-])")
        if not self.mqtt.client_id:
            self.mqtt.client_id = self.device_id

    @classmethod
    def from_agent(cls, agent: Any, base: Path | None = None) -> DeviceConfig:
        """From an agent's config (edge_agent's AgentConfig: `device`, `state_dir`, `trust`, `mqtt` table)."""
        table = dict(agent.mqtt or {})
        group = table.pop("group", "")
        ota = from_table(OtaSettings, table.pop("ota", None), "[mqtt.ota]", base)
        mqtt = MqttConfig.from_dict(table, "[mqtt]", base)
        return cls(device_id=agent.device, state_dir=str(agent.state_dir), trust=str(agent.trust or ""),
                   group=str(group), mqtt=mqtt, ota=ota)


class MqttSink:
    """An outbox sink (ports.RecordSink) over MQTT: QoS 1, acknowledged only after the broker's PUBACK.

    Each record becomes one pf.outbox/1 message on pf/v1/dev/<id>/telemetry whose `id` is the outbox
    record id (the cloud stores (device, id) once, so a redelivery is harmless). `route(record)` may map a
    record to (topic, payload) instead, e.g. for federated updates on pf/v1/dev/<id>/fl/up/...
    """

    def __init__(self, client: MqttClient, device_id: str, ack_timeout_s: float = 10.0,
                 route: Callable[[OutboxRecord], tuple[str, bytes] | None] | None = None) -> None:
        self.client = client
        self.device = device_id
        self.ack_timeout_s = ack_timeout_s
        self.route = route
        self.topic = dev_topic(device_id, "telemetry")
        self.too_big = 0

    def _message(self, record: OutboxRecord) -> tuple[str, bytes] | None:
        if self.route is not None:
            routed = self.route(record)
            if routed is not None:
                return routed
        try:
            body: Any = record.json()
        except (UnicodeDecodeError, ValueError):
            body = {"base64": base64.b64encode(record.payload).decode()}
        try:
            payload = encode("pf.outbox/1", device=self.device, id=record.id, kind=record.kind[:64] or "record",
                             created=record.created, body=body)
        except ProtocolError as exc:
            self.too_big += 1
            log.error("outbox record %s (%s) cannot be sent: %s", record.id, record.kind, exc)
            return None
        return self.topic, payload

    def send(self, records: Sequence[OutboxRecord]) -> Iterable[int]:
        if not self.client.connected:
            return []
        acked: list[int] = []
        done = threading.Event()
        lock = threading.Lock()
        waiting = [0]

        def on_ack(rid: int) -> Callable[[bool, str], None]:
            def cb(ok: bool, reason: str) -> None:
                with lock:
                    if ok:
                        acked.append(rid)
                    waiting[0] -= 1
                    if waiting[0] == 0:
                        done.set()
            return cb

        for record in records:
            msg = self._message(record)
            if msg is None:
                continue
            with lock:
                waiting[0] += 1
            if self.client.publish(msg[0], msg[1], qos=1, on_ack=on_ack(record.id)) < 0:
                break
        with lock:
            if waiting[0] == 0:
                done.set()
        done.wait(self.ack_timeout_s)
        with lock:
            return list(acked)


class DeviceLink:
    """The device's MQTT connection with presence, OTA into `store`, and a sink for the outbox.

    `install_slots` bounds concurrent package installs across the links that share it (a simulator
    running many devices in one process passes one semaphore to all of them)."""

    def __init__(self, config: DeviceConfig, store: ModelStoreLike,
                 install_slots: threading.Semaphore | None = None) -> None:
        self.config = config
        self.device = config.device_id
        self.store = store
        self.conn = secrets.token_hex(8)  # one per connection: a late will of an old one is ignored
        self._status_lock = threading.Lock()
        self.client = MqttClient(config.mqtt, client_id=config.mqtt.client_id or self.device, will=self._will(),
                                 on_connect=self._on_connect, on_disconnect=self._on_disconnect, name=self.device)
        self.ota = OtaClient(self.device, self.client, store, config.state_dir, config.ota,
                             on_change=self.publish_status, install_slots=install_slots)
        self.sink = MqttSink(self.client, self.device)

    def _will(self) -> Will:
        return Will(dev_topic(self.device, "status"), self._status_payload(online=False, reason="will"))

    def _status_payload(self, online: bool, reason: str | None = None) -> bytes:
        models: dict[str, int] = {}
        with contextlib.suppress(Exception):  # an unreadable store state reads as "nothing active"
            models = {n: m.active for n, m in self.store.read_state().items() if m.active is not None}
        ota = getattr(self, "ota", None)
        last = (ota.summary() if ota else None) or {}
        name = last.get("name") if last.get("name") in models else (sorted(models)[0] if models else None)
        active = {"name": name, "version": models[name]} if name else None
        return encode(
            "pf.status/1", device=self.device, online=online, ts=time.time(),
            seq=ota.next_seq() if ota else int(time.time() * 1000), conn=self.conn,
            group=self.config.group or None, active=active, models=models, ota=last or None,
            agent=AGENT_VERSION, reason=reason,
        )

    def publish_status(self) -> None:
        with self._status_lock:
            payload = self._status_payload(online=True)
        self.client.publish(dev_topic(self.device, "status"), payload, qos=1, retain=True)

    def _on_connect(self, session_present: bool) -> None:
        self.publish_status()
        self.ota.on_reconnect(session_present)

    def _on_disconnect(self, reason: str) -> None:
        self.conn = secrets.token_hex(8)
        self.client.set_will(self._will())

    def start(self) -> DeviceLink:
        self.client.start()
        self.ota.start()
        return self

    def stop(self, clean: bool = True) -> None:
        """clean=False drops the connection without DISCONNECT (the broker publishes the last will)."""
        self.ota.stop()
        if clean:
            try:
                payload = self._status_payload(online=False, reason="shutdown")
                self.client.publish(dev_topic(self.device, "status"), payload, qos=1, retain=True)
                time.sleep(0.05)
            except Exception:  # noqa: BLE001
                pass
        self.client.stop(clean=clean)
