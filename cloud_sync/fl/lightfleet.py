"""Lightweight simulated FL devices over a real broker: each device has its own MQTT 5 connection (its own
account and client id, so the broker's ACL confines it to its topics) and a real `FLClient`, but all
connections are driven by one selector thread instead of two threads per device, so one process can
hold a thousand of them. Used by the 1,000-device benchmark and its test.

    fleet = LightFleet(mqtt_for, {dev: fl_client_factory}, group="big").start()
    ...
    fleet.stop()
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import threading
import time
from collections.abc import Callable
from typing import Any

from cloud_sync.protocol import dev_topic, group_topic

from .mqtt import DOWN_TASK, UP_CHECKIN, UP_UPDATE

log = logging.getLogger("pocketfleet.fl.lightfleet")

ClientFactory = Callable[[Callable[[bytes], None], Callable[[bytes], None]], Any]  # (checkin, update) -> FLClient


class _Device:
    def __init__(self, fleet: LightFleet, name: str, cfg: Any, factory: ClientFactory) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.name, self.fleet, self.cfg = name, fleet, cfg
        self.mqtt = paho.Client(CallbackAPIVersion.VERSION2, client_id=cfg.client_id or name, protocol=paho.MQTTv5)
        if cfg.username:
            self.mqtt.username_pw_set(cfg.username, cfg.password)
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_message = self._on_message
        self.fl = factory(self._send(UP_CHECKIN), self._send(UP_UPDATE))
        self.connected = False
        self.sent: dict[str, int] = {UP_CHECKIN: 0, UP_UPDATE: 0}

    def _send(self, leaf: str) -> Callable[[bytes], None]:
        topic = dev_topic(self.name, leaf)

        def send(data: bytes) -> None:
            self.sent[leaf] += 1
            self.mqtt.publish(topic, data, qos=1)

        return send

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
        if reason.is_failure:
            log.warning("%s: connect refused: %s", self.name, reason)
            return
        self.connected = True
        client.subscribe([(group_topic(self.fleet.group, "fl/+/announce"), 1), (dev_topic(self.name, DOWN_TASK), 1)])

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            if msg.topic.endswith("/announce"):
                self.fl.on_announce(msg.payload)
            else:
                self.fl.on_task(msg.payload)
        except Exception:  # noqa: BLE001 - one device's failure must not stop the others
            self.fleet.errors += 1
            log.exception("%s: FL message failed", self.name)


class LightFleet:
    """Many FLClients, one MQTT connection each, one network thread for all of them."""

    def __init__(self, mqtt_for: Callable[[str], Any], factories: dict[str, ClientFactory], group: str = "default") -> None:
        self.group = group
        self.devices = {name: _Device(self, name, mqtt_for(name), f) for name, f in factories.items()}
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, timeout: float = 120.0) -> LightFleet:
        for d in self.devices.values():
            d.mqtt.connect(d.cfg.host, d.cfg.port, keepalive=120)
        self._thread = threading.Thread(target=self._loop, name="lightfleet", daemon=True)
        self._thread.start()
        end = time.monotonic() + timeout
        while not all(d.connected for d in self.devices.values()):
            if time.monotonic() > end:
                n = sum(d.connected for d in self.devices.values())
                raise TimeoutError(f"only {n} of {len(self.devices)} devices connected in {timeout:.0f} s")
            time.sleep(0.1)
        return self

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        registered: dict[int, _Device] = {}
        last_misc = 0.0
        while not self._stop.is_set():
            for d in self.devices.values():
                sock = d.mqtt.socket()
                if sock is not None and sock.fileno() not in registered:
                    registered[sock.fileno()] = d
                    sel.register(sock, selectors.EVENT_READ, d)
                if d.mqtt.want_write():
                    d.mqtt.loop_write()
            for key, _ in sel.select(timeout=0.02):
                key.data.mqtt.loop_read()
            now = time.monotonic()
            if now - last_misc > 1.0:
                for d in self.devices.values():
                    d.mqtt.loop_misc()
                last_misc = now
        sel.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for d in self.devices.values():
            with contextlib.suppress(Exception):
                d.mqtt.disconnect()
            sock = d.mqtt.socket()
            if sock is not None:
                sock.close()

    def sent(self, leaf: str = UP_UPDATE) -> int:
        return sum(d.sent[leaf] for d in self.devices.values())
