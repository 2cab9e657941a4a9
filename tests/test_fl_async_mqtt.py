"""FedBuff over a real mosquitto (ACL, passwords): devices that answer at very different speeds train
whenever they are free, the aggregator aggregates every K updates with staleness weights, with the
top-k + int8 codec and central DP; every update is counted once."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cloud_sync.client import MqttClient
from cloud_sync.fl.client import FLClient
from cloud_sync.fl.mqtt import MqttCloudTransport, MqttDeviceTransport
from cloud_sync.fl.rounds import Aggregator, TaskConfig
from edge_agent.fl import head_trainer_fn
from edge_agent.training import DenseLayer, Head, HeadTrainer, LocalDataset
from tests.fl_helpers import digits_flat
from tests.mosquitto import Mosquitto

HEAD = Head([DenseLayer("w", "b")])
DEVICES = [f"dev{i:02d}" for i in range(6)]


def _slow(fit, delay: float):  # noqa: ANN001, ANN202
    def run(weights, train):  # noqa: ANN001, ANN202
        time.sleep(delay)
        return fit(weights, train)

    return run


@pytest.mark.mosquitto
def test_fedbuff_over_mosquitto_with_codec_and_dp(tmp_path):
    accounts = {"flagg": ("cloud", None), **{d: ("device", "lab") for d in DEVICES}}
    x, y = digits_flat("train")
    xt, yt = digits_flat("test")
    parts = np.array_split(np.random.default_rng(1).permutation(len(y)), len(DEVICES))
    init = HEAD.init([64, 10], seed=0)
    with Mosquitto(tmp_path, accounts=accounts) as broker:
        links, clients = [], []
        for i, (dev, p) in enumerate(zip(DEVICES, parts, strict=True)):
            mc = MqttClient(broker.mqtt_config(dev), name=dev)
            link = MqttDeviceTransport(mc, dev, group="lab")
            trainer = _slow(head_trainer_fn(HeadTrainer(HEAD), LocalDataset({"features": x[p]}, y[p])), 0.02 + 0.4 * i)
            fl = FLClient(dev, trainer, len(p), tmp_path / dev, link.send_checkin, link.send_update)
            link.bind(fl)
            mc.start()
            links.append(link)
            clients.append(fl)
        for link in links:
            link.client.wait_connected(10)
        cloud = MqttClient(broker.mqtt_config("flagg"), name="flagg")
        transport = MqttCloudTransport(cloud, "pffl")
        agg = Aggregator(tmp_path / "fl.sqlite", transport,
                         evaluate=lambda t, w: {"accuracy": float((HEAD.predict(w, xt) == yt).mean())})
        transport.bind(agg)
        cloud.start().wait_connected(10)
        task = TaskConfig(task="async", rounds=6, strategy="fedbuff",
                          strategy_args={"buffer_size": 3, "concurrency": 4, "max_staleness": 4},
                          train={"epochs": 2, "lr": 0.1}, codec={"topk": 0.2, "int8": True, "min_sparse": 1},
                          dp={"clip_norm": 5.0, "noise_multiplier": 0.1, "population": 6}, group="lab", round_s=30)
        try:
            agg.create_task(task, init)
            st = agg.run("async", timeout=150)
        finally:
            for link in links:
                link.stop()
                link.client.stop()
            cloud.stop()
            agg.store.close()
    assert st["state"] == "finished" and st["model_version"] == 6
    done = [r for r in st["rounds"] if r["state"] == "done"]
    assert all(r["result"]["participants"] == 3 for r in done)
    assert all(r["result"]["epsilon"] > 0 for r in done)
    assert max(s for r in done for s in r["result"]["staleness"]) >= 1  # slow devices deliver onto newer models
    fast = sum(c.counters["updates"] for c in clients[:2])
    slow = sum(c.counters["updates"] for c in clients[-2:])
    assert fast > slow  # the fast devices are not held back by the slow ones
    c = st["counters"]
    assert c["accepted"] >= 18 and "duplicate" not in c
    dense = 4 * (64 * 10 + 10)
    assert max(r["result"]["bytes_up"] / 3 for r in done) < dense / 2
    assert done[-1]["result"]["metrics"]["accuracy"] > float((HEAD.predict(init, xt) == yt).mean()) + 0.2
