"""Many registered devices over a real mosquitto: lightweight devices (one MQTT connection and account
each, one selector thread for all) run FL rounds of a NumPy head; no update is lost."""

from __future__ import annotations

import numpy as np
import pytest

from cloud_sync.client import MqttClient
from cloud_sync.fl.client import FLClient
from cloud_sync.fl.lightfleet import LightFleet
from cloud_sync.fl.mqtt import MqttCloudTransport
from cloud_sync.fl.rounds import Aggregator, TaskConfig
from edge_agent.fl import head_trainer_fn
from edge_agent.training import DenseLayer, Head, HeadTrainer, LocalDataset
from tests.fl_helpers import digits_flat
from tests.mosquitto import Mosquitto

HEAD = Head([DenseLayer("w", "b")])


@pytest.mark.mosquitto
def test_200_registered_devices_20_per_round_lose_no_update(tmp_path):
    n, per_round, rounds = 200, 20, 3
    names = [f"d{i:04d}" for i in range(n)]
    x, y = digits_flat("train")
    rng = np.random.default_rng(0)
    accounts = {"flagg": ("cloud", None), **{d: ("device", "big") for d in names}}
    with Mosquitto(tmp_path, accounts=accounts, persistence=False) as broker:

        def factory(dev: str):  # noqa: ANN202
            idx = rng.choice(len(y), 20, replace=False)
            ds = LocalDataset({"features": x[idx]}, y[idx])
            return lambda checkin, update: FLClient(dev, head_trainer_fn(HeadTrainer(HEAD), ds), 20, tmp_path / "dev" / dev,
                                                    checkin, update)

        fleet = LightFleet(broker.mqtt_config, {d: factory(d) for d in names}, group="big").start(timeout=120)
        cloud = MqttClient(broker.mqtt_config("flagg"), name="flagg")
        transport = MqttCloudTransport(cloud, "pffl")
        agg = Aggregator(tmp_path / "fl.sqlite", transport)
        transport.bind(agg)
        cloud.start().wait_connected(10)
        try:
            agg.create_task(TaskConfig(task="big", rounds=rounds, clients_per_round=per_round, over_selection=1.0,
                                       checkin_target=n, checkin_s=20, round_s=60, train={"epochs": 1, "lr": 0.1},
                                       group="big"), HEAD.init([64, 10]))
            st = agg.run("big", timeout=240)
        finally:
            fleet.stop()
            cloud.stop()
            agg.store.close()
    assert st["state"] == "finished"
    done = [r for r in st["rounds"] if r["state"] == "done"]
    assert [r["result"]["participants"] for r in done] == [per_round] * rounds
    c = st["counters"]
    assert fleet.sent() == c["accepted"] == per_round * rounds  # every update sent was counted, none lost
    assert fleet.sent("fl/up/checkin") == n * rounds and fleet.errors == 0
