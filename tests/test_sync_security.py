"""No device can act as another, against a real mosquitto with the generated passwords and ACL:
foreign topics, foreign commands, session takeover, unauthenticated clients, TLS, and provisioning."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud_sync.client import Message, MqttClient
from cloud_sync.cloud import wait_for
from cloud_sync.config import MqttConfig
from cloud_sync.errors import ConnectError
from cloud_sync.protocol import dev_topic
from tests.mosquitto import Mosquitto, free_port, make_tls, require_mosquitto

pytestmark = pytest.mark.mosquitto

ACCOUNTS = {"dev-a": ("device", "lab"), "dev-b": ("device", "lab"), "cloud-1": ("cloud", None)}


@pytest.fixture
def broker(tmp_path: Path):
    with Mosquitto(tmp_path, accounts=dict(ACCOUNTS)) as b:
        yield b


def _client(broker: Mosquitto, user: str, **over: object) -> MqttClient:
    return MqttClient(broker.mqtt_config(user, **over))


def test_a_device_cannot_publish_on_another_devices_topics(broker: Mosquitto) -> None:
    cloud = _client(broker, "cloud-1")
    seen: list[Message] = []
    cloud.subscribe("pf/v1/#", seen.append)
    cloud.start().wait_connected()
    a = _client(broker, "dev-a").start().wait_connected()
    acks: dict[str, tuple[bool, str]] = {}
    for leaf in ("ota", "status", "req", "telemetry", "cmd", "chunk"):
        a.publish(dev_topic("dev-b", leaf), b"forged", on_ack=lambda ok, why, leaf=leaf: acks.__setitem__(leaf, (ok, why)))
    a.publish(dev_topic("dev-a", "cmd"), b"own cmd topic is read-only", on_ack=lambda ok, w: acks.__setitem__("own-cmd", (ok, w)))
    a.publish(dev_topic("dev-a", "ota"), b"mine", on_ack=lambda ok, w: acks.__setitem__("own", (ok, w)))
    wait_for(lambda: len(acks) == 8, 5)
    assert acks["own"][0] is True
    refused = {k: v for k, v in acks.items() if k != "own"}
    assert all(not ok and "authori" in why.lower() for ok, why in refused.values()), refused
    time.sleep(0.3)
    assert [m.topic for m in seen] == [dev_topic("dev-a", "ota")]
    a.stop()
    cloud.stop()


def test_a_device_cannot_read_another_devices_commands(broker: Mosquitto) -> None:
    a = _client(broker, "dev-a")
    stolen: list[Message] = []
    for flt in (dev_topic("dev-b", "cmd"), dev_topic("dev-b", "chunk"), "pf/v1/dev/+/cmd", "pf/v1/#", "#"):
        a.subscribe(flt, stolen.append)
    a.start().wait_connected()
    b = _client(broker, "dev-b")
    mine: list[Message] = []
    b.subscribe(dev_topic("dev-b", "cmd"), mine.append)
    b.start().wait_connected()
    cloud = _client(broker, "cloud-1").start().wait_connected()
    cloud.publish(dev_topic("dev-b", "cmd"), b"for b only")
    cloud.publish(dev_topic("dev-b", "chunk"), b"for b only")
    wait_for(lambda: mine, 5)
    time.sleep(0.5)
    assert stolen == []
    for c in (a, b, cloud):
        c.stop()


def test_claiming_another_client_id_does_not_take_over_its_session(broker: Mosquitto) -> None:
    b = _client(broker, "dev-b")
    b_got: list[Message] = []
    b.subscribe(dev_topic("dev-b", "cmd"), b_got.append)
    b.start().wait_connected()
    time.sleep(0.2)
    b.stop()
    cloud = _client(broker, "cloud-1").start().wait_connected()
    cloud.publish(dev_topic("dev-b", "cmd"), b"queued for b", expiry_s=60)
    time.sleep(0.3)
    impostor = MqttClient(broker.mqtt_config("dev-a"), client_id="dev-b")  # dev-a's credentials, dev-b's id
    stolen: list[Message] = []
    impostor.subscribe(dev_topic("dev-b", "cmd"), stolen.append)
    impostor.start().wait_connected()
    time.sleep(0.8)
    assert stolen == [] and not impostor.session_present
    impostor.stop()
    b2 = _client(broker, "dev-b")
    b2.subscribe(dev_topic("dev-b", "cmd"), b_got.append)
    b2.start().wait_connected()
    wait_for(lambda: b_got, 5)
    assert b_got[0].payload == b"queued for b"
    b2.stop()
    cloud.stop()


@pytest.mark.parametrize("creds", [{"username": "", "password": ""}, {"password": "wrong"},
                                   {"username": "nobody", "password": "pw-nobody"}])
def test_unauthenticated_clients_are_refused(broker: Mosquitto, creds: dict) -> None:
    cfg = broker.mqtt_config("dev-a")
    for key, value in creds.items():
        setattr(cfg, key, value)
    c = MqttClient(cfg, client_id="intruder")
    c.start()
    wait_for(lambda: c.counters.get("connect_refused") >= 1, 5)
    assert not c.connected and c.counters.get("connects") == 0 and "refused" in c.last_error
    c.stop()


def test_tls_is_enforced_when_configured(tmp_path: Path) -> None:
    with Mosquitto(tmp_path, accounts=dict(ACCOUNTS), tls=True) as broker:
        ok = _client(broker, "dev-a").start().wait_connected()
        ok.stop()
        plain = MqttClient(broker.mqtt_config("dev-a", tls_ca=""), client_id="plain")
        plain.connect_timeout_s = 1.0
        plain.start()
        wait_for(lambda: plain.counters.get("connack_timeouts") + plain.counters.get("closed_before_connack") >= 1, 5)
        assert not plain.connected and plain.counters.get("connects") == 0
        plain.stop()
        other_ca = make_tls(tmp_path / "other")[0]
        wrong = MqttClient(broker.mqtt_config("dev-a", tls_ca=str(other_ca)), client_id="wrong-ca")
        wrong.start()
        wait_for(lambda: wrong.counters.get("connect_failures") >= 1, 5)
        with pytest.raises(ConnectError, match="TCP/TLS"):
            wrong.wait_connected(0.2)
        assert wrong.counters.get("connects") == 0
        wrong.stop()


def test_provision_creates_credentials_acl_and_agent_config_the_broker_accepts(tmp_path: Path) -> None:
    from cloud_sync.device import DeviceConfig
    from edge_agent.config import load_config

    state = tmp_path / "cloud"
    passwd, acl, pid = state / "mosquitto" / "passwd", state / "mosquitto" / "acl", tmp_path / "mosquitto.pid"
    dynsec = state / "mosquitto" / "dynsec" / "dynamic-security.json"
    cfg = tmp_path / "cloud.toml"

    def run(*argv: str) -> dict:
        out = subprocess.run([str(Path(sys.executable).parent / "pocketfleet"), *argv, "--config", str(cfg), "--json"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    require_mosquitto()
    port = free_port()
    cfg.write_text(
        f'[cloud]\nstate_dir = "cloud"\nworker_id = "cloud-1"\n[mqtt]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[broker]\npasswd_file = "{passwd}"\nacl_file = "{acl}"\npid_file = "{pid}"\n'
    )
    run("cloud", "provision", "cloud-1", "--cloud-worker", "--out", str(tmp_path / "w1"))
    broker = Mosquitto(tmp_path, files=(passwd, acl, dynsec), port=port).start()
    try:
        pid.write_text(str(broker.pid))
        dev = run("cloud", "provision", "dev-new", "--group", "lab", "--out", str(tmp_path / "dev-new"))
        assert dev["reloaded"] is True, dev
        # devices live in the dynamic-security plugin (which saved the change), workers in the password file
        assert "dev-new" in dynsec.read_text() and "dev-new:" not in passwd.read_text() and "cloud-1:" in passwd.read_text()
        time.sleep(0.5)
        agent = load_config(dev["agent_config"])
        device = DeviceConfig.from_agent(agent, base=Path(dev["agent_config"]).parent)
        assert device.device_id == "dev-new" and device.group == "lab" and device.mqtt.port == port
        client = MqttClient(device.mqtt).start().wait_connected(5)
        acks: list[bool] = []
        client.publish(dev_topic("dev-new", "ota"), b"x", on_ack=lambda ok, _: acks.append(ok))
        client.publish(dev_topic("dev-a", "ota"), b"x", on_ack=lambda ok, _: acks.append(ok))
        wait_for(lambda: len(acks) == 2, 5)
        assert acks == [True, False]
        client.stop()
        listed = run("cloud", "devices")
        assert [d["device"] for d in listed] == ["dev-new"] and listed[0]["group"] == "lab"

        # the provisioned config, as is, runs a real agent process that comes online under its own id
        watch = MqttConfig(host="127.0.0.1", port=port, client_id="watch", username="cloud-1",
                           password_file=str(tmp_path / "w1" / "mqtt.password"))
        seen: list[dict] = []
        watcher = MqttClient(watch)
        watcher.subscribe(dev_topic("dev-new", "status"), lambda m: seen.append(json.loads(m.payload)), qos=1)
        watcher.start().wait_connected(5)
        agent = subprocess.Popen([str(Path(sys.executable).parent / "pocketfleet"), "agent", "run", "--config",
                                  dev["agent_config"], "--listen", "127.0.0.1:0"], stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: any(s["online"] for s in seen) or agent.poll() is not None, 30)
            assert agent.poll() is None, agent.stderr.read() if agent.stderr else ""
        finally:
            agent.terminate()
            agent.wait(20)
        wait_for(lambda: seen[-1]["online"] is False, 10)  # a clean stop publishes "offline" first
        assert seen[-1]["device"] == "dev-new" and seen[-1]["reason"] == "shutdown"
        watcher.stop()
    finally:
        broker.stop()


def test_generated_mosquitto_conf_runs_with_tls_auth_and_acl(tmp_path: Path) -> None:
    """`pocketfleet broker mosquitto-conf` writes a configuration a real mosquitto starts with."""
    import os
    import socket

    binary = require_mosquitto()
    ca, cert, key = make_tls(tmp_path / "tls")
    port = free_port()
    cfg = tmp_path / "cloud.toml"
    cfg.write_text(f'[cloud]\nstate_dir = "cloud"\n[mqtt]\nhost = "localhost"\nport = {port}\ntls_ca = "{ca}"\n')
    exe = str(Path(sys.executable).parent / "pocketfleet")

    def cli(*argv: str) -> dict:
        out = subprocess.run([exe, *argv, "--config", str(cfg), "--json"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    worker = cli("cloud", "provision", "cloud-1", "--cloud-worker", "--out", str(tmp_path / "w"))
    conf = tmp_path / "mosquitto.conf"
    made = cli("broker", "mosquitto-conf", "--port", str(port), "--host", "127.0.0.1", "--tls-ca", str(ca),
               "--tls-cert", str(cert), "--tls-key", str(key), "--persistence-dir", str(tmp_path / "data"),
               "--out", str(conf))
    assert made["tls"] is True
    text = conf.read_text()
    assert "max_queued_messages 100000" in text and "use_username_as_clientid true" in text
    (tmp_path / "data").mkdir(exist_ok=True)
    if os.geteuid() == 0:
        conf.write_text(text + "user root\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def up() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_for(up, 10)
        from cloud_sync.config import MqttConfig

        mqtt = MqttConfig(host="localhost", port=port, username="cloud-1", password_file=worker["password_file"],
                          tls_ca=str(ca))
        client = MqttClient(mqtt).start().wait_connected(10)
        assert client.mqtt5
        client.stop()
    finally:
        proc.terminate()
        proc.wait(10)
