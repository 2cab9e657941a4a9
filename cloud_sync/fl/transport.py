"""An in-process wire for tests and simulations: the aggregator and FLClients exchange the same bytes
they would over MQTT, through a queue delivered by `pump()`. Devices can be taken offline (their
messages are dropped, both ways) and messages duplicated, to inject faults."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from typing import Any


class InProcessHub:
    def __init__(self) -> None:
        self.queue: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self.clients: dict[str, Any] = {}
        self.groups: dict[str, str] = {}
        self.retained: dict[tuple[str, str], bytes] = {}
        self.aggregator: Any = None
        self.offline: set[str] = set()
        self.duplicate_updates = False
        self.bytes = Counter()

    # ---- wiring
    def attach(self, device: str, client: Any, group: str = "default") -> None:
        self.clients[device], self.groups[device] = client, group
        for (g, _), msg in self.retained.items():
            if g == group:
                self.queue.append((client.on_announce, (msg,)))

    def secagg_link(self, device: str) -> Callable[[bytes], None]:
        """send_secagg for an FLClient of `device`."""

        def send(data: bytes) -> None:
            if device not in self.offline:
                self.bytes["up"] += len(data)
                self.queue.append((self.aggregator.on_secagg, (device, data)))

        return send

    def device_links(self, device: str) -> tuple[Callable[[bytes], None], Callable[[bytes], None]]:
        """(send_checkin, send_update) for an FLClient of `device`."""

        def checkin(data: bytes) -> None:
            if device not in self.offline:
                self.queue.append((self.aggregator.on_checkin, (device, data)))

        def update(data: bytes) -> None:
            if device in self.offline:
                return
            self.bytes["up"] += len(data)
            for _ in range(2 if self.duplicate_updates else 1):
                self.queue.append((self.aggregator.on_update, (device, data)))

        return checkin, update

    # ---- CloudTransport
    def broadcast(self, group: str, task: str, announce: bytes) -> None:
        self.retained[(group, task)] = announce
        for dev, client in self.clients.items():
            if self.groups[dev] == group and dev not in self.offline:
                self.queue.append((client.on_announce, (announce,)))

    def send_task(self, device: str, task: str, payload: bytes) -> None:
        if device in self.offline or device not in self.clients:
            return
        self.bytes["down"] += len(payload)
        self.queue.append((self.clients[device].on_task, (payload,)))

    def send_secagg(self, device: str, task: str, payload: bytes) -> None:
        if device in self.offline or device not in self.clients:
            return
        self.bytes["down"] += len(payload)
        self.queue.append((self.clients[device].on_secagg, (payload,)))

    # ---- delivery
    def pump(self, limit: int | None = None) -> int:
        n = 0
        while self.queue and (limit is None or n < limit):
            fn, args = self.queue.popleft()
            fn(*args)
            n += 1
        return n
