"""The MQTT client against a real mosquitto (and amqtt): sessions, expiry, last will, reconnects, bad input,
the 3.1.1 fallback, and a burst of 100 devices through the durable outbox with two cloud workers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from cloud_sync.client import Message, MqttClient
from cloud_sync.cloud import Cloud, CloudConfig, CloudSettings, wait_for
from cloud_sync.device import DeviceConfig, DeviceLink, MqttSink
from cloud_sync.protocol import decode, dev_topic, encode
from edge_agent.store import ModelStore
from tests.mosquitto import Mosquitto

pytestmark = pytest.mark.mosquitto

ACCOUNTS = {"dev-a": ("device", "lab"), "dev-b": ("device", "lab"), "cloud-1": ("cloud", None),
            "cloud-2": ("cloud", None)}


@pytest.fixture
def broker(tmp_path: Path):
    with Mosquitto(tmp_path, accounts=dict(ACCOUNTS)) as b:
        yield b


def _collect(client: MqttClient, topic: str) -> list[Message]:
    got: list[Message] = []
    client.subscribe(topic, got.append)
    return got


def test_persistent_session_delivers_commands_queued_while_offline(broker: Mosquitto) -> None:
    dev = MqttClient(broker.mqtt_config("dev-a"))
    got = _collect(dev, dev_topic("dev-a", "cmd"))
    dev.start().wait_connected()
    time.sleep(0.2)
    dev.stop()
    cloud = MqttClient(broker.mqtt_config("cloud-1")).start().wait_connected()
    acks: list[bool] = []
    for i in range(5):
        cloud.publish(dev_topic("dev-a", "cmd"), b"cmd-%d" % i, qos=1, expiry_s=60, on_ack=lambda ok, _: acks.append(ok))
    wait_for(lambda: len(acks) == 5, 5)
    assert all(acks)
    again = MqttClient(broker.mqtt_config("dev-a"))
    again.subscribe(dev_topic("dev-a", "cmd"), got.append)
    again.start().wait_connected()
    wait_for(lambda: len(got) == 5, 5)
    assert again.session_present and again.mqtt5
    assert [m.payload for m in got] == [b"cmd-%d" % i for i in range(5)]
    again.stop()
    cloud.stop()


def test_message_expiry_drops_stale_commands(broker: Mosquitto) -> None:
    dev = MqttClient(broker.mqtt_config("dev-a"))
    got = _collect(dev, dev_topic("dev-a", "cmd"))
    dev.start().wait_connected()
    time.sleep(0.2)
    dev.stop()
    cloud = MqttClient(broker.mqtt_config("cloud-1")).start().wait_connected()
    cloud.publish(dev_topic("dev-a", "cmd"), b"stale", qos=1, expiry_s=1)
    cloud.publish(dev_topic("dev-a", "cmd"), b"fresh", qos=1, expiry_s=120)
    time.sleep(2.5)
    dev2 = MqttClient(broker.mqtt_config("dev-a"))
    dev2.subscribe(dev_topic("dev-a", "cmd"), got.append)
    dev2.start().wait_connected()
    wait_for(lambda: got, 5)
    time.sleep(0.5)
    assert [m.payload for m in got] == [b"fresh"]
    dev2.stop()
    cloud.stop()


def test_last_will_marks_a_vanished_device_offline(broker: Mosquitto, tmp_path: Path) -> None:
    cfg = DeviceConfig("dev-a", str(tmp_path / "dev-a"), mqtt=broker.mqtt_config("dev-a"))
    link = DeviceLink(cfg, store=ModelStore(cfg.state_dir, None)).start()
    link.client.wait_connected()
    time.sleep(0.3)
    link.stop(clean=False)  # no DISCONNECT: the broker must publish the will
    watcher = MqttClient(broker.mqtt_config("cloud-1"))
    seen = _collect(watcher, dev_topic("dev-a", "status"))
    watcher.start().wait_connected()
    wait_for(lambda: seen and not decode(seen[-1].payload, ("pf.status/1",))["online"], 10)
    status = decode(seen[-1].payload, ("pf.status/1",))
    assert seen[-1].retain and status["reason"] == "will" and status["device"] == "dev-a"
    watcher.stop()


def test_reconnects_after_a_broker_restart(broker: Mosquitto) -> None:
    dev = MqttClient(broker.mqtt_config("dev-a"))
    got = _collect(dev, dev_topic("dev-a", "cmd"))
    dev.start().wait_connected()
    broker.restart()
    wait_for(lambda: dev.counters.get("connects") >= 2 and dev.connected, 20)
    assert dev.counters.get("disconnects") >= 1
    cloud = MqttClient(broker.mqtt_config("cloud-1")).start().wait_connected()
    cloud.publish(dev_topic("dev-a", "cmd"), b"after restart")
    wait_for(lambda: got, 5)
    dev.stop()
    cloud.stop()


def test_malformed_and_oversized_messages_are_counted_and_dropped(broker: Mosquitto, tmp_path: Path) -> None:
    cfg = DeviceConfig("dev-a", str(tmp_path / "dev-a"), mqtt=broker.mqtt_config("dev-a"))
    link = DeviceLink(cfg, store=ModelStore(cfg.state_dir, None)).start()
    link.client.wait_connected()
    cloud = MqttClient(broker.mqtt_config("cloud-1"))
    reports = _collect(cloud, dev_topic("dev-a", "ota"))
    cloud.start().wait_connected()
    time.sleep(0.3)
    for payload in (b"not json", b'{"schema": "pf.cmd.update/1"}', b"\x00" * (2 << 20)):
        cloud.publish(dev_topic("dev-a", "cmd"), payload)
    cloud.publish(dev_topic("dev-a", "chunk"), b"PFCK-garbage")
    wait_for(lambda: link.client.counters.get("malformed") >= 4, 10)
    # the device still works: a valid rollback command for an unknown release is answered
    cmd = encode("pf.cmd.rollback/1", cmd_id="1" * 16, rollout_id="2" * 16, release_id="3" * 16, name="m",
                 version=9, issued=time.time(), expires=time.time() + 60)
    cloud.publish(dev_topic("dev-a", "cmd"), cmd)
    wait_for(lambda: reports, 10)
    assert decode(reports[-1].payload, ("pf.ota.report/1",))["state"] == "rolled_back"
    assert link.client.counters.get("handler_errors") == 0
    link.stop()
    cloud.stop()


def test_falls_back_to_mqtt_311_on_the_embedded_broker() -> None:
    from cloud_sync.broker import EmbeddedBroker
    from cloud_sync.config import MqttConfig

    broker = EmbeddedBroker(port=0).start()
    try:
        cfg = MqttConfig(port=broker.port, client_id="dev-x", protocol="auto", reconnect_min_s=0.1)
        dev = MqttClient(cfg)
        dev.connect_timeout_s = 1.0
        got = _collect(dev, "pf/v1/dev/dev-x/cmd")
        dev.start().wait_connected(15)
        assert not dev.mqtt5
        other = MqttClient(MqttConfig(port=broker.port, client_id="cloud", protocol="3.1.1")).start().wait_connected()
        other.publish("pf/v1/dev/dev-x/cmd", b"hello 3.1.1")
        wait_for(lambda: got, 5)
        assert got[0].payload == b"hello 3.1.1"
        dev.stop()
        other.stop()
    finally:
        broker.stop()


def test_burst_from_100_devices_through_the_outbox_loses_nothing(tmp_path: Path) -> None:
    """100 devices drain 20 outbox records each at the same moment into two cloud workers sharing the load
    (a shared subscription) that spend >= 2 ms per record: every record is stored exactly once and every
    outbox is empty, i.e. each record was deleted only after the broker acknowledged it."""
    from edge_agent.outbox import Outbox

    devices = [f"dev-{i:03d}" for i in range(100)]
    accounts = {d: ("device", "lab") for d in devices} | {"cloud-1": ("cloud", None), "cloud-2": ("cloud", None)}
    with Mosquitto(tmp_path, accounts=accounts, persistence=False) as broker:
        state = tmp_path / "cloud"
        workers = []
        for wid in ("cloud-1", "cloud-2"):
            cfg = CloudConfig(cloud=CloudSettings(state_dir=str(state), worker_id=wid), mqtt=broker.mqtt_config(wid))
            w = Cloud(cfg)
            original = w.registry.add_telemetry_batch

            def slow(items: list, _orig=original, **kw: object) -> int:
                time.sleep(0.002 * len(items))  # a slow consumer: 2 ms per record
                return _orig(items, **kw)

            w.registry.add_telemetry_batch = slow  # type: ignore[method-assign]
            workers.append(w.start())
        reg = workers[0].registry
        for d in devices:
            reg.ensure_device(d, "lab")
        clients = [MqttClient(broker.mqtt_config(d)).start() for d in devices]
        outboxes = [Outbox(tmp_path / "outbox" / f"{d}.sqlite") for d in devices]
        for c in clients:
            c.wait_connected()
        go, filled = threading.Event(), threading.Semaphore(0)

        def drain(client: MqttClient, ob: Outbox, device: str) -> None:
            for i in range(20):
                ob.put("telemetry", {"device": device, "i": i})
            filled.release()
            sink = MqttSink(client, device, ack_timeout_s=60)
            go.wait()
            while ob.stats()["records"]:
                records = ob.lease(64)
                ob.ack(sink.send(records))
                ob.release(r.id for r in records)

        threads = [threading.Thread(target=drain, args=(c, ob, d)) for c, ob, d in zip(clients, outboxes, devices, strict=True)]
        for t in threads:
            t.start()
        for _ in threads:
            filled.acquire(timeout=60)
        go.set()  # every device publishes at the same moment
        for t in threads:
            t.join(120)
        wait_for(lambda: len(reg.telemetry()) >= 2000, 60)
        time.sleep(0.5)
        rows = reg.telemetry()
        assert len(rows) == 2000
        assert len({(r["device"], r["record_id"]) for r in rows}) == 2000
        assert all(ob.stats()["records"] == 0 and ob.stats()["acked_records"] == 20 for ob in outboxes)
        shares = [w.counters.get("received") for w in workers]
        assert all(s > 200 for s in shares), f"both workers share the load: {shares}"
        for c in clients:
            c.stop()
        for w in workers:
            w.stop()
        for ob in outboxes:
            ob.close()


def test_broker_run_command_serves_clients() -> None:
    import socket
    import subprocess
    import sys

    from cloud_sync.config import MqttConfig
    from tests.mosquitto import free_port

    port = free_port()
    exe = str(Path(sys.executable).parent / "pocketfleet")
    proc = subprocess.Popen([exe, "broker", "run", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        def listening() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_for(listening, 30)
        cfg = MqttConfig(port=port, protocol="3.1.1", reconnect_min_s=0.1)
        sub = MqttClient(cfg, client_id="sub")
        got = _collect(sub, "pf/v1/dev/x/cmd")
        sub.start().wait_connected()
        pub = MqttClient(cfg, client_id="pub").start().wait_connected()
        pub.publish("pf/v1/dev/x/cmd", b"via pocketfleet broker run")
        wait_for(lambda: got, 10)
        sub.stop()
        pub.stop()
    finally:
        proc.terminate()
        proc.wait(15)
    assert f"127.0.0.1:{port}" in proc.stdout.read()


def test_a_retired_worker_drains_its_share_and_takes_no_more(tmp_path: Path) -> None:
    """mosquitto queues a share of shared-subscription messages for an offline persistent member: a worker
    that stops for good is retired, which delivers its queued share and leaves the group."""
    with Mosquitto(tmp_path, accounts=dict(ACCOUNTS), persistence=False) as broker:
        state = str(tmp_path / "cloud")

        def worker(wid: str) -> Cloud:
            return Cloud(CloudConfig(cloud=CloudSettings(state_dir=state, worker_id=wid), mqtt=broker.mqtt_config(wid)))

        w1, w2 = worker("cloud-1").start(), worker("cloud-2").start()
        w1.registry.ensure_device("dev-a", "lab")
        w2.stop()  # its session (and shared subscription) stays with the broker
        dev = MqttClient(broker.mqtt_config("dev-a")).start().wait_connected()

        def send(first: int, n: int) -> None:
            acks: list[bool] = []
            for i in range(first, first + n):
                msg = encode("pf.outbox/1", device="dev-a", id=i, kind="t", created=1.0, body={"i": i})
                dev.publish(dev_topic("dev-a", "telemetry"), msg, on_ack=lambda ok, _: acks.append(ok))
            wait_for(lambda: len(acks) == n and all(acks), 10)

        send(0, 20)
        time.sleep(0.5)
        stranded = 20 - len(w1.registry.telemetry())
        assert stranded > 0, "mosquitto queued a share for the offline member"
        retiring = worker("cloud-2").start()
        retiring.retire(idle_s=1.0)
        wait_for(lambda: len(w1.registry.telemetry()) == 20, 10)
        send(20, 10)
        wait_for(lambda: len(w1.registry.telemetry()) == 30, 10)
        assert w1.counters.get("received") >= 20 + 10 - stranded
        dev.stop()
        w1.stop()
