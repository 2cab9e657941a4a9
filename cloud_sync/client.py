"""A resilient MQTT client over paho-mqtt 2.x, used by devices and by the cloud (torch-free).

- MQTT 5 first; when the broker answers "unsupported protocol version" (amqtt, old brokers) and the
  config says `protocol = "auto"`, the client is rebuilt for MQTT 3.1.1 and connects again.
- Persistent session: clean_start false with a session expiry (3.1.1: clean_session false), so QoS 1
  messages sent while the client is away wait in the broker; receive-maximum bounds what the broker
  pushes at once, max_inflight bounds our own unacknowledged publishes.
- Last will (presence), TLS with CA and hostname verification, username/password.
- Reconnects forever with exponential backoff and full jitter; subscriptions are renewed on every connect.
- Every incoming message goes to the handler of the first matching filter inside a guard: a handler that
  raises ProtocolError counts as `malformed`, any other exception as `handler_errors`; both are logged and
  the message is dropped. Nothing a peer sends can stop the network loop.
- `publish(..., on_ack=cb)` calls `cb(ok, reason)` when the broker's PUBACK arrives (QoS 1), which is what
  the outbox sink needs to delete a record only once the broker has it.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_sync.config import MqttConfig
from cloud_sync.errors import ConnectError, ProtocolError
from cloud_sync.protocol import Counters

log = logging.getLogger("pocketfleet.mqtt")

Handler = Callable[["Message"], None]
AckCallback = Callable[[bool, str], None]

_UNSUPPORTED_PROTOCOL = 132  # MQTT 5 CONNACK reason 0x84 (also what paho maps a 3.1.1 rc=1 to)


class _Watchdog:
    """One thread for all clients: a socket that got no CONNACK within connect_timeout_s is dropped.

    paho waits for a CONNACK indefinitely; some MQTT 3.1.1-only brokers never answer an MQTT 5 CONNECT
    that carries properties. With protocol = "auto" such a silence also triggers the 3.1.1 fallback.
    """

    _lock = threading.Lock()
    _clients: list[MqttClient] = []
    _thread: threading.Thread | None = None

    @classmethod
    def watch(cls, client: MqttClient) -> None:
        with cls._lock:
            cls._clients.append(client)
            if cls._thread is None or not cls._thread.is_alive():
                cls._thread = threading.Thread(target=cls._run, name="mqtt-watchdog", daemon=True)
                cls._thread.start()

    @classmethod
    def unwatch(cls, client: MqttClient) -> None:
        with cls._lock:
            if client in cls._clients:
                cls._clients.remove(client)

    @classmethod
    def _run(cls) -> None:
        while True:
            time.sleep(0.5)
            with cls._lock:
                clients = list(cls._clients)
            now = time.monotonic()
            for c in clients:
                try:
                    c._check_connack(now)
                except Exception:  # noqa: BLE001
                    log.exception("watchdog check failed")


@dataclass(frozen=True)
class Message:
    """An incoming message, decoupled from paho's object. `mid` is needed to acknowledge it manually."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    mid: int = 0


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def packet_bytes(topic: str, payload_len: int, qos: int, props: int = 0) -> int:
    """Bytes of an MQTT PUBLISH packet on the wire (fixed header + topic + packet id + properties + payload)."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + props + payload_len
    varint = 1 if remaining < 128 else 2 if remaining < 16384 else 3 if remaining < 2097152 else 4
    return 1 + varint + remaining


def topic_kind(topic: str) -> str:
    """The leaf kind of a pf/v1 topic for per-kind counters: status, ota, req, telemetry, cmd, chunk, fl, ..."""
    parts = topic.split("/")
    if len(parts) >= 5 and parts[0] == "pf" and parts[2] in ("dev", "grp"):
        return parts[4]
    return "other"


class MqttClient:
    """One broker connection. Thread-safe: publish/subscribe may be called from any thread."""

    def __init__(
        self,
        config: MqttConfig,
        client_id: str | None = None,
        will: Will | None = None,
        on_connect: Callable[[bool], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
        name: str = "",
        manual_ack: bool = False,
    ) -> None:
        self.config = config
        self.client_id = client_id or config.client_id or config.username
        if not self.client_id:
            raise ConnectError("an MQTT client needs a client id (persistent sessions are keyed by it)")
        self.will = will
        self.name = name or self.client_id
        self.counters = Counters()
        self._on_connect_cb = on_connect
        self._on_disconnect_cb = on_disconnect
        self.manual_ack = manual_ack
        # (filter, match filter, qos, handler, handler acks itself)
        self._subs: list[tuple[str, str, int, Handler, bool]] = []
        self._lock = threading.RLock()
        self._pending: dict[int, AckCallback | None] = {}
        self._early: dict[int, tuple[bool, str]] = {}
        self._capacity = threading.Condition(self._lock)
        self._connected = threading.Event()
        self._stopped = threading.Event()
        self._attempt = 0
        self.protocol = mqtt.MQTTv311 if config.protocol == "3.1.1" else mqtt.MQTTv5
        self.last_error = ""
        self.session_present = False
        self._client: mqtt.Client | None = None
        self._socket_opened: float | None = None
        self._ever_connacked = False
        self.connect_timeout_s = 5.0
        self._fail_logged = -1e9

    # ------------------------------------------------------------------------------------------ lifecycle

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def mqtt5(self) -> bool:
        return self.protocol == mqtt.MQTTv5

    def link_state(self) -> dict[str, Any]:
        """What a health endpoint shows: connected or not, to where, the last error, attempts and connects."""
        c = self.counters
        return {"connected": self.connected, "broker": f"{self.config.host}:{self.config.port}",
                "last_error": self.last_error, "connects": c.get("connects"),
                "connect_failures": c.get("connect_failures"), "connect_refused": c.get("connect_refused")}

    def start(self) -> MqttClient:
        """Start connecting in the background (returns at once; see wait_connected)."""
        self._stopped.clear()
        self._client = self._build()
        self._client.loop_start()
        _Watchdog.watch(self)
        return self

    def wait_connected(self, timeout: float = 10.0) -> MqttClient:
        if not self._connected.wait(timeout):
            raise ConnectError(
                f"{self.name}: not connected to {self.config.host}:{self.config.port} after {timeout:g}s"
                + (f" ({self.last_error})" if self.last_error else "")
            )
        return self

    def stop(self, clean: bool = True) -> None:
        """Disconnect. clean=False drops the socket without DISCONNECT, so the broker sends the last will."""
        self._stopped.set()
        _Watchdog.unwatch(self)
        client = self._client
        if client is None:
            return
        if clean:
            with contextlib.suppress(Exception):  # best effort on the way out
                client.disconnect()
        else:
            self._drop_socket(client)
        client.loop_stop()
        self._connected.clear()

    def set_will(self, will: Will) -> None:
        """Replace the last will; it is sent with the next CONNECT (call it from on_disconnect)."""
        self.will = will
        if self._client is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)

    def drop_connection(self) -> None:
        """Fault injection / link loss: close the socket abruptly; the client reconnects on its own."""
        if self._client is not None:
            self._drop_socket(self._client)

    @staticmethod
    def _drop_socket(client: mqtt.Client) -> None:
        sock = client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    # ---------------------------------------------------------------------------------------- paho setup

    def _build(self) -> mqtt.Client:
        cfg = self.config
        v5 = self.protocol == mqtt.MQTTv5
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=self.protocol,
            clean_session=None if v5 else False,
            reconnect_on_failure=True,
            manual_ack=self.manual_ack,
        )
        paho_log = logging.getLogger("pocketfleet.paho")
        if paho_log.isEnabledFor(logging.DEBUG):  # paho logs routine disconnects as errors otherwise
            client.enable_logger(paho_log)
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.secret() or None)
        if cfg.tls_ca:
            client.tls_set(
                ca_certs=cfg.tls_ca,
                certfile=cfg.tls_cert or None,
                keyfile=cfg.tls_key or None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
            client.tls_insecure_set(False)
        if self.will is not None:
            client.will_set(self.will.topic, self.will.payload, qos=self.will.qos, retain=self.will.retain)
        client.max_inflight_messages_set(cfg.max_inflight)
        client.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_min_s)  # type: ignore[arg-type]
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = self._on_socket_open
        props = None
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = cfg.session_expiry_s
            props.ReceiveMaximum = cfg.receive_maximum
        client.connect_async(
            cfg.host, cfg.port, keepalive=cfg.keepalive_s, clean_start=False if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )
        return client

    def _backoff(self) -> None:
        """Next reconnect delay: full jitter over an exponentially growing cap."""
        cfg = self.config
        cap = min(cfg.reconnect_max_s, cfg.reconnect_min_s * (2 ** min(self._attempt, 16)))
        delay = random.uniform(cfg.reconnect_min_s, max(cfg.reconnect_min_s, cap))
        self._attempt += 1
        if self._client is not None:
            self._client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._socket_opened = time.monotonic()

    def _check_connack(self, now: float) -> None:
        opened = self._socket_opened
        if opened is None or self._connected.is_set() or self._stopped.is_set():
            return
        if now - opened < self.connect_timeout_s:
            return
        self._socket_opened = None
        self.counters.add("connack_timeouts")
        self.last_error = f"no CONNACK within {self.connect_timeout_s:g}s"
        if self.config.protocol == "auto" and self.mqtt5 and not self._ever_connacked:
            log.warning("%s: %s to an MQTT 5 CONNECT; trying MQTT 3.1.1", self.name, self.last_error)
            threading.Thread(target=self._fallback, name=f"{self.name}-fallback", daemon=True).start()
        else:
            log.warning("%s: %s; reconnecting", self.name, self.last_error)
            if self._client is not None:
                self._drop_socket(self._client)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._socket_opened = None
        self._ever_connacked = True
        if reason.is_failure:
            self.last_error = f"connection refused: {reason}"
            self.counters.add("connect_refused")
            log.warning("%s: %s", self.name, self.last_error)
            if int(reason.value) == _UNSUPPORTED_PROTOCOL and self.config.protocol == "auto" and self.mqtt5:
                threading.Thread(target=self._fallback, name=f"{self.name}-fallback", daemon=True).start()
            self._backoff()
            return
        self._attempt = 0
        self.last_error = ""
        self.session_present = bool(flags.session_present)
        self.counters.add("connects")
        with self._lock:
            subs = list(self._subs)
        if subs:
            client.subscribe([(self._wire_filter(f), q) for f, _, q, _, _ in subs])
        self._connected.set()
        log.info("%s: connected (MQTT %s, session present %s)", self.name, "5" if self.mqtt5 else "3.1.1",
                 self.session_present)
        if self._on_connect_cb is not None:
            try:
                self._on_connect_cb(self.session_present)
            except Exception:  # noqa: BLE001 - a callback bug must not kill the network loop
                self.counters.add("handler_errors")
                log.exception("%s: on_connect callback failed", self.name)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self.counters.add("connect_failures")
        self.last_error = "cannot reach the broker (TCP/TLS connection failed)"
        now = time.monotonic()
        if now - self._fail_logged >= 60.0:  # the first failure, then at most one line a minute
            self._fail_logged = now
            log.warning("%s: cannot reach the broker at %s:%d (TCP/TLS connection failed; %d attempt(s)); retrying",
                        self.name, self.config.host, self.config.port, self.counters.get("connect_failures"))
        self._backoff()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if self._stopped.is_set():
            return
        if was:
            self.counters.add("disconnects")
            log.info("%s: disconnected (%s); reconnecting", self.name, reason)
        elif self._socket_opened is not None:  # no CONNACK at all (e.g. plain MQTT to a TLS listener)
            self._socket_opened = None
            self.counters.add("closed_before_connack")
            self.last_error = f"the broker closed the connection before CONNACK ({reason})"
        self._backoff()
        if self._on_disconnect_cb is not None and was:
            try:
                self._on_disconnect_cb(str(reason))
            except Exception:  # noqa: BLE001
                log.exception("%s: on_disconnect callback failed", self.name)

    def _fallback(self) -> None:
        """The broker speaks only MQTT 3.1.1: rebuild the paho client for it (pending publishes fail)."""
        old = self._client
        if old is None or self._stopped.is_set() or not self.mqtt5:
            return
        self._drop_socket(old)
        old.loop_stop()
        log.info("%s: broker does not speak MQTT 5; falling back to 3.1.1", self.name)
        self.protocol = mqtt.MQTTv311
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for cb in pending:
            if cb is not None:
                cb(False, "client rebuilt for MQTT 3.1.1")
        self._client = self._build()
        self._client.loop_start()

    # --------------------------------------------------------------------------------------- subscribing

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1, acks_itself: bool = False) -> None:
        """Route messages matching `topic_filter` to `handler` (renewed on every reconnect).

        A `$share/<group>/...` filter becomes a plain subscription on an MQTT 3.1.1 connection. With
        `manual_ack` clients, the PUBACK goes out when the handler returns, unless `acks_itself`: then the
        handler (or whoever it hands the message to) calls `ack(message)` once the message is safe.
        """
        if acks_itself and not self.manual_ack:
            raise ConnectError(f"{self.name}: acks_itself needs MqttClient(manual_ack=True)")
        match = topic_filter.split("/", 2)[2] if topic_filter.startswith("$share/") else topic_filter
        with self._lock:
            self._subs.append((topic_filter, match, qos, handler, acks_itself))
        client = self._client
        if client is not None and self._connected.is_set():
            client.subscribe(self._wire_filter(topic_filter), qos)

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop routing `topic_filter` and tell the broker (also for the persistent session)."""
        with self._lock:
            self._subs = [s for s in self._subs if s[0] != topic_filter]
        client = self._client
        if client is not None and self._connected.is_set():
            client.unsubscribe(self._wire_filter(topic_filter))

    def _wire_filter(self, topic_filter: str) -> str:
        if topic_filter.startswith("$share/") and not self.mqtt5:
            return topic_filter.split("/", 2)[2]
        return topic_filter

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        for rc in reasons:
            if getattr(rc, "is_failure", False):
                self.counters.add("subscribe_refused")
                log.warning("%s: subscription refused by the broker: %s", self.name, rc)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.counters.add("received")
        kind = topic_kind(msg.topic)
        self.counters.add(f"in:{kind}")
        self.counters.add("bytes_in", packet_bytes(msg.topic, len(msg.payload), msg.qos))
        if msg.qos:
            self.counters.add("bytes_out", 4)  # our PUBACK
        message = Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), bool(msg.dup), msg.mid)
        with self._lock:
            route = next(((h, a) for _, m, _, h, a in self._subs if mqtt.topic_matches_sub(m, msg.topic)), None)
        if route is None:
            self.counters.add("unrouted")
            self.ack(message)
            return
        handler, acks_itself = route
        try:
            handler(message)
        except ProtocolError as exc:
            self.counters.add("malformed")
            self.counters.add(f"malformed:{kind}")
            log.warning("%s: dropped malformed message on %s: %s", self.name, msg.topic, exc)
            acks_itself = False
        except Exception:  # noqa: BLE001 - never let one message stop the loop
            self.counters.add("handler_errors")
            log.exception("%s: handler for %s failed; message dropped", self.name, msg.topic)
            acks_itself = False
        if not acks_itself:
            self.ack(message)

    def ack(self, message: Message) -> None:
        """Send the PUBACK of a message (manual_ack clients only; a no-op otherwise and for QoS 0)."""
        client = self._client
        if self.manual_ack and client is not None and message.qos > 0:
            client.ack(message.mid, message.qos)

    # ---------------------------------------------------------------------------------------- publishing

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
        on_ack: AckCallback | None = None,
    ) -> int:
        """Queue a message; `on_ack(ok, reason)` runs when the broker acknowledged it (QoS 1) or it was sent (QoS 0).

        Queued messages survive reconnects of this process (paho resends unacknowledged QoS 1 messages), not
        a process restart: durable data goes through the SQLite outbox, which re-sends until acknowledged.
        """
        client = self._client
        if client is None:
            raise ConnectError(f"{self.name}: publish before start()")
        props = None
        if expiry_s is not None and self.mqtt5:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = int(expiry_s)
        info = client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self.counters.add("publish_errors")
            if on_ack is not None:
                on_ack(False, mqtt.error_string(info.rc))
            return -1
        self.counters.add("published")
        self.counters.add(f"out:{topic_kind(topic)}")
        self.counters.add("bytes_out", packet_bytes(topic, len(payload), qos, 5 if props else 0))
        early = None
        with self._lock:
            if info.mid in self._early:
                early = self._early.pop(info.mid)
            else:
                self._pending[info.mid] = on_ack
        if early is not None and on_ack is not None:
            on_ack(*early)
        return info.mid

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        ok = not getattr(reason, "is_failure", False)
        why = str(reason)
        if not ok:
            self.counters.add("publish_refused")
            log.warning("%s: broker refused publish %d: %s", self.name, mid, why)
        with self._lock:
            if mid not in self._pending:
                self._early[mid] = (ok, why)
                return
            cb = self._pending.pop(mid)
            self._capacity.notify_all()
        self.counters.add("acked" if ok else "nacked")
        self.counters.add("bytes_in", 4)  # the broker's PUBACK (QoS 0 sends have none; close enough)
        if cb is not None:
            try:
                cb(ok, why)
            except Exception:  # noqa: BLE001
                self.counters.add("handler_errors")
                log.exception("%s: ack callback failed", self.name)

    @property
    def unacked(self) -> int:
        with self._lock:
            return len(self._pending)

    def wait_capacity(self, limit: int, timeout: float) -> bool:
        """Block until fewer than `limit` publishes await acknowledgement (flow control for bulk senders)."""
        deadline = time.monotonic() + timeout
        with self._capacity:
            while len(self._pending) >= limit:
                left = deadline - time.monotonic()
                if left <= 0 or self._stopped.is_set():
                    return False
                self._capacity.wait(min(left, 0.5))
        return True
