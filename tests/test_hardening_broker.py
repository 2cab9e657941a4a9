"""Broker-side hardening against a real mosquitto (issue 12, cases 2 and 14): devices cannot join the cloud's
shared subscription groups, and the generated files run a stock mosquitto that drops to its own user."""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from cloud_sync.client import Message, MqttClient
from cloud_sync.cloud import wait_for
from cloud_sync.protocol import dev_filter, dev_topic
from tests.mosquitto import Mosquitto, free_port, require_mosquitto

pytestmark = pytest.mark.mosquitto

ACCOUNTS = {"dev-a": ("device", "lab"), "dev-b": ("device", "lab"), "cloud-1": ("cloud", None)}
SHARE = "pfcloud"


def _client(broker: Mosquitto, user: str, **over: object) -> MqttClient:
    return MqttClient(broker.mqtt_config(user, **over))


def _publish_20(dev: MqttClient, start: int) -> None:
    acks: list[bool] = []
    for i in range(start, start + 20):
        dev.publish(dev_topic("dev-a", "telemetry"), json.dumps({"n": i}).encode(), on_ack=lambda ok, _: acks.append(ok))
    wait_for(lambda: len(acks) == 20, 10)
    assert all(acks)


@pytest.mark.parametrize("leaf", ["telemetry", "ota", "req"])
def test_a_device_cannot_join_the_clouds_shared_group(tmp_path: Path, leaf: str) -> None:
    """20 of 20 messages reach the cloud while another device subscribes to the cloud's group, online and
    offline on a persistent session (before: 10 of 20 — mosquitto counted the attacker as a member)."""
    with Mosquitto(tmp_path, accounts=dict(ACCOUNTS)) as broker:
        got: list[Message] = []
        cloud = _client(broker, "cloud-1")
        cloud.subscribe(dev_filter(leaf, SHARE), got.append, qos=1)
        cloud.start().wait_connected()
        attacker = _client(broker, "dev-b")
        stolen: list[Message] = []
        attacker.subscribe(dev_filter(leaf, SHARE), stolen.append, qos=1)
        attacker.subscribe("$share/other/" + dev_filter(leaf), stolen.append, qos=1)
        attacker.start().wait_connected()
        wait_for(lambda: attacker.counters.get("subscribe_refused") >= 2, 5)
        dev = _client(broker, "dev-a").start().wait_connected()
        acks: list[bool] = []
        for i in range(20):
            dev.publish(dev_topic("dev-a", leaf), json.dumps({"n": i}).encode(), on_ack=lambda ok, _: acks.append(ok))
        wait_for(lambda: len(acks) == 20, 10)
        wait_for(lambda: len(got) >= 20, 10)
        # offline on a persistent session: the broker must not queue a share of the group for the attacker
        attacker.stop()
        for i in range(20, 40):
            dev.publish(dev_topic("dev-a", leaf), json.dumps({"n": i}).encode(), on_ack=lambda ok, _: acks.append(ok))
        wait_for(lambda: len(acks) == 40, 10)
        wait_for(lambda: len(got) >= 40, 10)
        time.sleep(0.3)
        assert sorted(json.loads(m.payload)["n"] for m in got) == list(range(40))
        assert stolen == []
        for c in (dev, cloud):
            c.stop()


def _cli(cfg: Path, *argv: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """`pocketfleet ARGV --config CFG --json` in this process (what a subprocess would print and return)."""
    import contextlib
    import io

    from pocketfleet.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*argv, "--config", str(cfg), "--json"])
    done = subprocess.CompletedProcess(["pocketfleet", *argv], code, out.getvalue(), err.getvalue())
    if ok:
        assert code == 0, done.stderr
    return done


def test_provision_refuses_to_change_an_accounts_role_without_the_flag(tmp_path: Path) -> None:
    cfg = tmp_path / "cloud.toml"
    cfg.write_text('[cloud]\nstate_dir = "cloud"\n')
    _cli(cfg, "cloud", "provision", "cloud-1", "--cloud-worker", "--out", str(tmp_path / "w"))
    _cli(cfg, "cloud", "provision", "dev-a", "--group", "lab", "--out", str(tmp_path / "a"))
    acl = (tmp_path / "cloud" / "mosquitto" / "acl").read_text()
    for argv in (("dev-a", "--cloud-worker"), ("cloud-1", "--group", "lab")):
        out = _cli(cfg, "cloud", "provision", *argv, ok=False)
        assert out.returncode != 0 and "--change-role" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert (tmp_path / "cloud" / "mosquitto" / "acl").read_text() == acl  # nothing changed
    changed = json.loads(_cli(cfg, "cloud", "provision", "dev-a", "--cloud-worker", "--change-role").stdout)
    assert changed["role_changed"] == "device -> cloud"


def _world_dir() -> Path:
    """A folder the `mosquitto` user can reach (pytest's tmp_path is 0700 under /tmp/pytest-of-root)."""
    d = Path(tempfile.mkdtemp(prefix="pf-stock-mosquitto-", dir="/tmp"))
    d.chmod(0o755)
    return d


def test_generated_files_run_a_stock_mosquitto_that_drops_to_its_own_user() -> None:
    """No `user root`: as root, mosquitto drops to `mosquitto` (as its packaged service does) and must still
    read the password/ACL files and write the dynamic-security file (before: root-owned 0600 files)."""
    import shutil

    binary = require_mosquitto()
    work = _world_dir()
    try:
        port = free_port()
        cfg = work / "cloud.toml"
        pid = work / "mosquitto.pid"
        cfg.write_text(f'[cloud]\nstate_dir = "cloud"\nworker_id = "cloud-1"\n[mqtt]\nhost = "127.0.0.1"\n'
                       f'port = {port}\n[broker]\npid_file = "{pid}"\n')
        (work / "cloud").mkdir(mode=0o755)
        w = json.loads(_cli(cfg, "cloud", "provision", "cloud-1", "--cloud-worker", "--out", str(work / "w")).stdout)
        a = json.loads(_cli(cfg, "cloud", "provision", "dev-a", "--group", "lab", "--out", str(work / "a")).stdout)
        conf = work / "mosquitto.conf"
        refused = _cli(cfg, "broker", "mosquitto-conf", "--port", str(port), "--host", "0.0.0.0", "--out", str(conf),
                       ok=False)
        assert refused.returncode != 0 and "TLS" in refused.stderr and not conf.exists()
        made = json.loads(_cli(cfg, "broker", "mosquitto-conf", "--port", str(port), "--persistence-dir",
                               str(work / "data"), "--out", str(conf)).stdout)
        assert made["host"] == "127.0.0.1" and f"listener {port} 127.0.0.1" in conf.read_text()
        assert "user root" not in conf.read_text()
        if os.geteuid() == 0:
            owner = pwd.getpwnam("mosquitto").pw_uid
            assert Path(made["passwd"]).stat().st_uid == owner and Path(made["acl"]).stat().st_uid == owner
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        try:
            def up() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"mosquitto exited: {proc.stderr.read() if proc.stderr else ''}")
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                        return True
                except OSError:
                    return False

            wait_for(up, 10)
            pid.write_text(str(proc.pid))
            from cloud_sync.config import MqttConfig

            def connect(user: str, pw_file: str) -> MqttClient:
                return MqttClient(MqttConfig(host="127.0.0.1", port=port, username=user,
                                             password_file=pw_file)).start().wait_connected(10)

            connect("cloud-1", w["password_file"]).stop()
            connect("dev-a", a["password_file"]).stop()
            # a device provisioned while the broker runs as `mosquitto` (the plugin rewrites its own file)
            b = json.loads(_cli(cfg, "cloud", "provision", "dev-b", "--group", "lab", "--out", str(work / "b")).stdout)
            assert b["reloaded"] is True, b
            dev_b = connect("dev-b", b["password_file"])
            acks: list[bool] = []
            dev_b.publish(dev_topic("dev-b", "ota"), b"x", on_ack=lambda ok, _: acks.append(ok))
            dev_b.publish(dev_topic("dev-a", "ota"), b"x", on_ack=lambda ok, _: acks.append(ok))
            wait_for(lambda: len(acks) == 2, 5)
            assert acks == [True, False]
            dev_b.stop()
            assert "dev-b" in Path(made["dynsec"]).read_text()
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        shutil.rmtree(work, ignore_errors=True)
