"""Federated learning on the agent: the cloud_sync FL client wired to the agent's own trainers, served
package and local data (torch-free; whole-model fine-tuning needs torch only when it runs).

`device_fl` starts FL on the agent's MQTT connection; `head_trainer_fn` / `torch_trainer_fn` adapt the
agent's trainers (edge_agent.training) to the FLClient trainer signature `(weights, train) -> result`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cloud_sync.fl.client import FLClient, Trainer
from cloud_sync.fl.mqtt import MqttDeviceTransport
from edge_agent.training import HeadTrainer, TrainConfig

log = logging.getLogger("pocketfleet.agent.fl")


def device_fl(
    client: Any, device: str, group: str, state_dir: str | Path,
    package_dir: Callable[[], Path], dataset: Callable[[], Any], count: Callable[[], int] | None = None,
) -> MqttDeviceTransport:
    """Start FL on a device: head training on the active package (re-read when its path changes) with
    the data `dataset()` returns (e.g. SampleStore(...).dataset or load_dataset_dir). `count()` says how
    many samples there are without loading them (default: len(dataset())); 0 = do not check in. Returns
    the link (call .stop() on shutdown). `client` is the agent's cloud_sync.client.MqttClient."""
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


def head_trainer_fn(trainer: Any, dataset: Any) -> Trainer:
    """Adapter: an edge_agent.training.HeadTrainer on a LocalDataset as an FLClient trainer."""
    def fit(weights: Mapping[str, np.ndarray], train: dict[str, Any]) -> Any:
        return trainer.fit(weights, dataset, TrainConfig.from_dict(train))

    return fit


def torch_trainer_fn(module: Any, dataset: Any, input_names: list[str] | None = None, threads: int = 1) -> Trainer:
    """Adapter: whole-model fine-tuning (needs torch on the device) as an FLClient trainer."""
    from edge_agent.training import finetune_torch

    def fit(weights: Mapping[str, np.ndarray], train: dict[str, Any]) -> Any:
        return finetune_torch(module, dataset, TrainConfig.from_dict(train), weights, input_names, threads)

    return fit
