"""Glue for the agent daemon and the demo: FL on a device from its active package and local data, and
a few federated rounds across a set of devices (used by `pocketfleet demo`)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .client import FLClient
from .mqtt import MqttDeviceTransport

log = logging.getLogger("pocketfleet.fl.agent")


def device_fl(
    client: Any, device: str, group: str, state_dir: str | Path,
    package_dir: Callable[[], Path], dataset: Callable[[], Any], count: Callable[[], int] | None = None,
) -> MqttDeviceTransport:
    """Start FL on a device: head training on the active package (re-read when its path changes) with
    the data `dataset()` returns (e.g. SampleStore(...).dataset or load_dataset_dir). `count()` says how
    many samples there are without loading them (default: len(dataset())); 0 = do not check in. Returns
    the link (call .stop() on shutdown). `client` is the agent's cloud_sync.client.MqttClient."""
    from edge_agent.training import HeadTrainer, TrainConfig

    cache: dict[str, Any] = {}

    def trainer(weights: dict[str, np.ndarray], train: dict[str, Any]) -> Any:
        path = str(package_dir())
        if cache.get("path") != path:
            cache.update(path=path, trainer=HeadTrainer.from_package_dir(path))
        return cache["trainer"].fit(weights, dataset(), TrainConfig.from_dict(train))

    def samples() -> int:
        try:
            return count() if count is not None else len(dataset())
        except Exception:  # noqa: BLE001 - no data yet: do not check in
            return 0

    link = MqttDeviceTransport(client, device, group)
    link.bind(FLClient(device, trainer, samples, Path(state_dir) / "fl", link.send_checkin, link.send_update,
                       send_secagg=link.send_secagg))
    return link


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
    from compress.zoo.digits_data import digits_split
    from edge_agent.training import DenseLayer, Head, LocalDataset

    from .client import head_trainer_fn
    from .mqtt import MqttCloudTransport
    from .partition import dirichlet_split
    from .rounds import Aggregator, TaskConfig

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
