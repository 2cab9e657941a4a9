"""The embedded development broker: amqtt (MQTT 3.1.1) in a background thread.

For development and the demo only: anonymous access, no ACL, no TLS, sessions in memory. Clients fall
back to MQTT 3.1.1 on it (no shared subscriptions, no message expiry; run one cloud worker with
`shared_group = ""`). Production and the security tests use mosquitto (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

from cloud_sync.errors import SyncError

log = logging.getLogger("pocketfleet.broker")


class EmbeddedBroker:
    """`EmbeddedBroker(port=0).start()` listens on a free port (see `.port`); `stop()` shuts it down."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port or _free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        self._thread = threading.Thread(target=self._run, name="amqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise SyncError(f"the embedded broker did not start on {self.host}:{self.port}: {self._error}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise SyncError(f"the embedded broker is not listening on {self.host}:{self.port}")

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported through start()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        from amqtt.broker import Broker

        logging.getLogger("amqtt").setLevel(logging.CRITICAL)  # it logs every dropped connection as an error
        logging.getLogger("transitions").setLevel(logging.WARNING)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 0}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(lambda loop, ctx: log.debug("amqtt: %s", ctx.get("message")))
        self._stop = asyncio.Event()
        broker = Broker(config)
        await broker.start()
        self._ready.set()
        log.info("embedded amqtt broker listening on %s:%d", self.host, self.port)
        await self._stop.wait()
        await broker.shutdown()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def run_forever(self) -> None:
        self.start()
        try:
            while self._thread is not None and self._thread.is_alive():
                self._thread.join(1.0)
        except KeyboardInterrupt:
            self.stop()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
