"""A few federated rounds of a NumPy head on the digits across simulated devices over a real broker
(used by `pocketfleet demo`, the tests and benchmarks)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("pocketfleet.sim.fl")


def demo_rounds(
    mqtt_config: Callable[[str], Any], devices: list[str], rounds: int = 3, group: str = "demo",
    cloud_user: str = "cloud-fl", print_fn: Callable[[str], None] = print, workdir: str | Path | None = None,
    secagg: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A few federated rounds of a NumPy head on digits across `devices` over the broker that
    `mqtt_config(username)` points at; prints and returns test accuracy per round.

    Each device gets a Dirichlet(0.5) share of the digits train split (raw 8x8 pixels as features).
    """
    from cloud_sync.client import MqttClient
    from cloud_sync.fl.client import FLClient
    from cloud_sync.fl.mqtt import MqttCloudTransport, MqttDeviceTransport
    from cloud_sync.fl.partition import dirichlet_split
    from cloud_sync.fl.rounds import Aggregator, TaskConfig
    from compress.zoo.digits_data import digits_split
    from edge_agent.fl import head_trainer_fn
    from edge_agent.training import DenseLayer, Head, LocalDataset

    work = Path(workdir or tempfile.mkdtemp(prefix="pf-fl-demo-"))
    x, y = digits_split("train")
    xt, yt = digits_split("test")
    x, xt = x.reshape(len(x), -1), xt.reshape(len(xt), -1)
    head = Head([DenseLayer("w", "b")])
    parts = dirichlet_split(y, len(devices), 0.5, seed=0)
    links = []
    from edge_agent.training import HeadTrainer

    for dev, p in zip(devices, parts, strict=True):
        mc = MqttClient(mqtt_config(dev), name=dev)
        link = MqttDeviceTransport(mc, dev, group)
        link.bind(FLClient(dev, head_trainer_fn(HeadTrainer(head), LocalDataset({"features": x[p]}, y[p])),
                           len(p), work / dev, link.send_checkin, link.send_update, send_secagg=link.send_secagg))
        mc.start()
        links.append(link)
    cloud = MqttClient(mqtt_config(cloud_user), name=cloud_user)
    transport = MqttCloudTransport(cloud, "pffl")
    agg = Aggregator(work / "fl.sqlite", transport,
                     evaluate=lambda t, w: {"accuracy": float((head.predict(w, xt) == yt).mean())})
    transport.bind(agg)
    try:
        for link in links:
            link.client.wait_connected(20)
        cloud.start().wait_connected(20)
        per_round = max(2, len(devices) // 2)
        task = TaskConfig(task="demo-digits", rounds=rounds, clients_per_round=per_round, min_clients=1,
                          checkin_target=len(devices), checkin_s=3.0, round_s=60.0, group=group,
                          train={"epochs": 3, "lr": 0.1}, secagg=secagg,
                          codec={} if secagg else {"topk": 0.1, "int8": True, "min_sparse": 1})
        agg.create_task(task, head.init([64, 10], seed=0))
        status = agg.run(task.task, timeout=300, progress=lambda r: print_fn(
            f"federated round {r['round'] + 1}/{rounds}: {r['result']['participants']} devices, "
            f"test accuracy {r['result']['metrics']['accuracy']:.3f}, {r['result']['bytes_up']} bytes up"))
    finally:
        for link in links:
            link.stop()
            link.client.stop()
        cloud.stop()
        agg.store.close()
    return {"state": status["state"], "accuracy": [r["result"]["metrics"]["accuracy"] for r in status["rounds"]
                                                   if r["state"] == "done"]}
