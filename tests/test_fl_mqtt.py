"""Federated rounds over a real mosquitto (ACL, passwords, persistence): real device FL clients train a
NumPy head on digits, the aggregator runs as its own process (`python -m cloud_sync.fl start`) and is
killed with SIGKILL mid-round and restarted, and the broker is restarted mid-round; every round still
aggregates exactly its target, each update counted once."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cloud_sync.client import MqttClient
from cloud_sync.fl import tensors as T
from cloud_sync.fl.client import FLClient
from cloud_sync.fl.mqtt import MqttDeviceTransport, wait_until
from edge_agent.fl import head_trainer_fn
from edge_agent.training import DenseLayer, Head, HeadTrainer, LocalDataset
from tests.fl_helpers import digits_flat
from tests.mosquitto import Mosquitto

ROOT = Path(__file__).resolve().parents[1]
HEAD = Head([DenseLayer("w", "b")])
DEVICES = [f"dev{i:02d}" for i in range(8)]


def _slow(fit, delay: float):  # noqa: ANN001, ANN202
    def run(weights, train):  # noqa: ANN001, ANN202
        time.sleep(delay)
        return fit(weights, train)

    return run


def _round_state(db: Path) -> tuple[int, str] | None:
    if not db.exists():
        return None
    try:
        with sqlite3.connect(db, timeout=5) as con:
            row = con.execute("SELECT round, state FROM rounds ORDER BY round DESC, attempt DESC LIMIT 1").fetchone()
            n = con.execute("SELECT COUNT(*) FROM updates WHERE round = ?", (row[0],)).fetchone()[0] if row else 0
    except sqlite3.Error:
        return None
    return (row[0], row[1], n) if row else None


@pytest.mark.mosquitto
@pytest.mark.slow
def test_rounds_over_mosquitto_survive_aggregator_kill_and_broker_restart(tmp_path):
    accounts = {"flagg": ("cloud", None), **{d: ("device", "lab") for d in DEVICES}}
    x, y = digits_flat("train")
    parts = np.array_split(np.random.default_rng(1).permutation(len(y)), len(DEVICES))
    with Mosquitto(tmp_path, accounts=accounts) as broker:
        cfg = broker.mqtt_config("flagg")
        (tmp_path / "cloud.toml").write_text(
            f'[cloud]\nstate_dir = "state"\nworker_id = "flagg"\n'
            f'[mqtt]\nhost = "{cfg.host}"\nport = {cfg.port}\nusername = "flagg"\npassword = "{cfg.password}"\n'
            f"reconnect_min_s = 0.1\nreconnect_max_s = 1.0\n"
        )
        (tmp_path / "init.safetensors").write_bytes(T.weights_to_bytes(HEAD.init([64, 10], seed=0)))
        links, clients = [], []
        for dev, p in zip(DEVICES, parts, strict=True):
            mc = MqttClient(broker.mqtt_config(dev), name=dev)
            link = MqttDeviceTransport(mc, dev, group="lab")
            fl = FLClient(dev, _slow(head_trainer_fn(HeadTrainer(HEAD), LocalDataset({"features": x[p]}, y[p])),
                                     0.25 * len(links)), len(p),
                          tmp_path / dev, link.send_checkin, link.send_update, send_secagg=link.send_secagg)
            link.bind(fl)
            mc.start()
            links.append(link)
            clients.append(fl)
        for link in links:
            link.client.wait_connected(10)
        cmd = [sys.executable, "-m", "cloud_sync.fl", "start", "--task", "digits", "--rounds", "4",
               "--config", str(tmp_path / "cloud.toml"), "--weights", str(tmp_path / "init.safetensors"),
               "--group", "lab", "--clients-per-round", "4", "--over-selection", "1.5", "--over-selection-grace", "0", "--checkin-s", "1",
               "--round-s", "30", "--train", "epochs=2,lr=0.1", "--codec", "topk=0.1,int8=1", "--json"]
        db = tmp_path / "state" / "fl.sqlite"
        try:
            agg = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            # kill -9 while round 1 is training (after at least one of its updates landed, if we can)
            # devices answer 0 .. 1.75 s apart, so round 1 spends seconds with some but not all updates in
            assert wait_until(lambda: (lambda s: s[0] >= 1 and s[1] == "training" and s[2] >= 1)(
                _round_state(db) or (0, "", 0)), 90, 0.02), "never saw round 1+ training with an update in"
            agg.send_signal(signal.SIGKILL)
            agg.wait(10)
            killed_at = _round_state(db)
            broker.restart()  # the broker goes away mid-round too (sessions and retained messages persist)
            for link in links:
                link.client.wait_connected(20)
            agg = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = agg.communicate(timeout=120)
        finally:
            if agg.poll() is None:
                agg.kill()
            for link in links:
                link.stop()
                link.client.stop()
        assert agg.returncode == 0, err.decode()[-3000:]
        status = json.loads(out)
    assert killed_at[0] >= 1 and killed_at[1] == "training" and killed_at[2] >= 1
    assert status["state"] == "finished" and status["model_version"] == 4
    done = [r for r in status["rounds"] if r["state"] == "done"]
    assert [r["round"] for r in done] == [0, 1, 2, 3]
    assert all(r["result"]["participants"] == 4 for r in done)
    assert status["counters"]["accepted"] == 16  # exactly once each, whatever was redelivered
    shown = subprocess.run([sys.executable, "-m", "cloud_sync.fl", "status", "--task", "digits", "--config",
                            str(tmp_path / "cloud.toml"), "--json"], cwd=ROOT, capture_output=True, timeout=60)
    assert shown.returncode == 0 and json.loads(shown.stdout)["model_version"] == 4
    acc_start = float((HEAD.predict(HEAD.init([64, 10], seed=0), x) == y).mean())
    with sqlite3.connect(db) as con:
        blob = con.execute("SELECT weights FROM models WHERE version = 4").fetchone()[0]
    final = T.weights_from_bytes(blob)[1]
    assert float((HEAD.predict(final, x) == y).mean()) > acc_start + 0.2
    assert sum(c.counters["updates"] for c in clients) >= 16


@pytest.mark.mosquitto
def test_demo_rounds_print_accuracy_per_round(tmp_path):
    from pocketfleet.sim.fl_rounds import demo_rounds

    lines: list[str] = []
    with Mosquitto(tmp_path, accounts=None) as broker:
        out = demo_rounds(lambda user: broker.mqtt_config(user), [f"demo{i}" for i in range(4)], rounds=2,
                          print_fn=lines.append, workdir=tmp_path / "demo")
    assert out["state"] == "finished" and len(out["accuracy"]) == 2 and out["accuracy"][-1] > 0.3
    assert len(lines) == 2 and lines[0].startswith("federated round 1/2") and "test accuracy" in lines[1]


@pytest.mark.mosquitto
def test_agent_glue_trains_the_active_package_head_on_posted_samples(tmp_path):
    from cloud_sync.fl.mqtt import MqttCloudTransport
    from cloud_sync.fl.rounds import Aggregator, TaskConfig
    from compress.zoo.digits_data import digits_split
    from edge_agent.fl import device_fl
    from edge_agent.training import SampleStore
    from tests.fl_helpers import head_package

    _, pkg_dir, _ = head_package(tmp_path)
    trainer = HeadTrainer.from_package_dir(pkg_dir)
    x, y = digits_split("train")
    xt, yt = digits_split("test")
    test_feats = trainer.features(LocalDataset({"image": xt}, yt))
    devices = ["edge-a", "edge-b", "edge-c"]
    stores = {}
    for i, dev in enumerate(devices):  # samples arrive as the local API would store them
        stores[dev] = SampleStore(tmp_path / dev / "samples.db")
        for j in range(i, len(y), 3):
            stores[dev].add({"image": x[j]}, int(y[j]))
    with Mosquitto(tmp_path, accounts=None) as broker:
        links = []
        for dev in devices:
            mc = MqttClient(broker.mqtt_config(dev), name=dev)
            links.append(device_fl(mc, dev, "lab", tmp_path / dev, lambda: pkg_dir, stores[dev].dataset))
            mc.start()
        cloud = MqttClient(broker.mqtt_config("cloud-x"), name="cloud-x")
        transport = MqttCloudTransport(cloud)
        agg = Aggregator(tmp_path / "fl.sqlite", transport, evaluate=lambda t, w: {
            "accuracy": float((trainer.head.predict(w, test_feats) == yt).mean())})
        transport.bind(agg)
        try:
            for link in links:
                link.client.wait_connected(10)
            cloud.start().wait_connected(10)
            agg.create_task(TaskConfig(task="pkg-head", rounds=2, clients_per_round=3, over_selection=1.0,
                                       checkin_target=3, checkin_s=5, round_s=60, group="lab",
                                       train={"epochs": 3, "lr": 0.1}), trainer.initial)
            status = agg.run("pkg-head", timeout=120)
        finally:
            for link in links:
                link.stop()
                link.client.stop()
            cloud.stop()
    before = float((trainer.head.predict(trainer.initial, test_feats) == yt).mean())
    accs = [r["result"]["metrics"]["accuracy"] for r in status["rounds"] if r["state"] == "done"]
    assert status["state"] == "finished" and len(accs) == 2 and accs[-1] > before + 0.3


@pytest.mark.mosquitto
def test_secure_aggregation_rounds_over_mosquitto(tmp_path):
    from pocketfleet.sim.fl_rounds import demo_rounds

    with Mosquitto(tmp_path, accounts=None) as broker:
        out = demo_rounds(lambda user: broker.mqtt_config(user), [f"sec{i}" for i in range(6)], rounds=2,
                          print_fn=lambda _: None, workdir=tmp_path / "sec", secagg={"threshold": 0.6, "clip": 0.5})
    assert out["state"] == "finished" and len(out["accuracy"]) == 2 and out["accuracy"][-1] > 0.3
