"""The FL round protocol on sync's MQTT layer (cloud_sync.client.MqttClient, topics of cloud_sync.protocol).

Topics (docs/federated.md; device ACL: publish under dev/<self>/fl/up/#, read dev/<self>/fl/down/# and
grp/<its group>/#):
  pf/v1/grp/<group>/fl/<task>/announce   cloud -> devices  JSON pf.fl.announce/1, QoS 1, retained
  pf/v1/dev/<id>/fl/up/checkin           device -> cloud   JSON pf.fl.checkin/1, QoS 1
  pf/v1/dev/<id>/fl/down/task            cloud -> device   safetensors global weights + pf.fl.task/1
                                                           header, QoS 1, message expiry = deadline
  pf/v1/dev/<id>/fl/up/update            device -> cloud   safetensors update (pf.fl.update/1), QoS 1
The cloud reads fl/up through an MQTT 5 shared subscription ($share/<group>/...), so aggregator
workers share the load; a message's device id is the one in its topic (the broker ACL enforces it).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from cloud_sync.protocol import dev_filter, dev_topic, group_topic, parse_dev_topic

log = logging.getLogger("pocketfleet.fl.mqtt")

UP_CHECKIN, UP_UPDATE, DOWN_TASK = "fl/up/checkin", "fl/up/update", "fl/down/task"
UP_SECAGG, DOWN_SECAGG = "fl/up/secagg", "fl/down/secagg"


def announce_topic(group: str, task: str) -> str:
    return group_topic(group, f"fl/{task}/announce")


class MqttCloudTransport:
    """CloudTransport for `Aggregator` over an MqttClient; `bind(aggregator)` subscribes fl/up."""

    def __init__(self, client: Any, shared_group: str | None = "pffl", task_expiry_s: int = 3600) -> None:
        self.client, self.shared_group, self.task_expiry_s = client, shared_group, task_expiry_s
        self.aggregator: Any = None

    def bind(self, aggregator: Any) -> MqttCloudTransport:
        self.aggregator = aggregator
        self.client.subscribe(dev_filter("fl/up/#", self.shared_group), self._on_message, qos=1)
        return self

    def _on_message(self, msg: Any) -> None:
        device, leaf = parse_dev_topic(msg.topic)  # ProtocolError -> counted as malformed by the client
        if leaf == UP_CHECKIN:
            self.aggregator.on_checkin(device, msg.payload)
        elif leaf == UP_UPDATE:
            self.aggregator.on_update(device, msg.payload)
        elif leaf == UP_SECAGG:
            self.aggregator.on_secagg(device, msg.payload)
        else:
            self.client.counters.add("fl_unknown_leaf")

    def broadcast(self, group: str, task: str, announce: bytes) -> None:
        self.client.publish(announce_topic(group, task), announce, qos=1, retain=True)

    def send_task(self, device: str, task: str, payload: bytes) -> None:
        self.client.publish(dev_topic(device, DOWN_TASK), payload, qos=1, expiry_s=self.task_expiry_s)

    def send_secagg(self, device: str, task: str, payload: bytes) -> None:
        self.client.publish(dev_topic(device, DOWN_SECAGG), payload, qos=1, expiry_s=self.task_expiry_s)


class MqttDeviceTransport:
    """The device side: feeds an FLClient from MQTT and gives it its two send functions.

    Training runs on a worker thread, never on the MQTT network thread.
    """

    def __init__(self, client: Any, device: str, group: str = "default") -> None:
        self.client, self.device, self.group = client, device, group
        self.fl: Any = None
        self._work: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def send_checkin(self, data: bytes) -> None:
        self.client.publish(dev_topic(self.device, UP_CHECKIN), data, qos=1)

    def send_update(self, data: bytes) -> None:
        self.client.publish(dev_topic(self.device, UP_UPDATE), data, qos=1)

    def send_secagg(self, data: bytes) -> None:
        self.client.publish(dev_topic(self.device, UP_SECAGG), data, qos=1)

    def bind(self, fl_client: Any) -> MqttDeviceTransport:
        self.fl = fl_client
        self.client.subscribe(group_topic(self.group, "fl/+/announce"), lambda m: self._work.put(("a", m.payload)), qos=1)
        self.client.subscribe(dev_topic(self.device, DOWN_TASK), lambda m: self._work.put(("t", m.payload)), qos=1)
        self.client.subscribe(dev_topic(self.device, DOWN_SECAGG), lambda m: self._work.put(("s", m.payload)), qos=1)
        self._thread = threading.Thread(target=self._loop, name=f"{self.device}-fl", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while (item := self._work.get()) is not None:
            kind, payload = item
            try:
                {"a": self.fl.on_announce, "t": self.fl.on_task, "s": self.fl.on_secagg}[kind](payload)
            except Exception:  # noqa: BLE001 - a failed round must not stop the device
                self.fl.counters["errors"] += 1
                log.exception("%s: FL message (%s) failed", self.device, kind)

    def idle(self) -> bool:
        return self._work.empty()

    def stop(self, timeout: float = 10.0) -> None:
        self._work.put(None)
        if self._thread is not None:
            self._thread.join(timeout)


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
