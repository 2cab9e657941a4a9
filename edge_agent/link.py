"""What a running agent starts when its config has an [mqtt] table (torch-free).

    link = AgentLink(agent).start()      # done by edge_agent.daemon.Agent.start()
    ...
    link.stop()

One MQTT connection (cloud_sync.device.DeviceLink) carries presence, OTA rollouts into the agent's own
model store (the agent's store watcher swaps to what OTA activates) and the agent's outbox. Federated
learning rides the same connection: the device checks in for a round when the model it serves declares
a `trainable_head` and it has labelled data (the `dataset_dir` of the config, else the samples posted to
`POST /v1/samples`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cloud_sync.device import DeviceConfig, DeviceLink
from edge_agent.fl import device_fl
from edge_agent.outbox import Drainer

log = logging.getLogger("pocketfleet.agent.link")


class AgentLink:
    def __init__(self, agent: Any, drain: bool = True) -> None:
        cfg = agent.config
        self.agent = agent
        device = DeviceConfig.from_agent(cfg, base=Path(cfg.base_dir) if cfg.base_dir else None)
        self.link = DeviceLink(device, store=agent.store)
        self.client = self.link.client
        # the agent's durable outbox drains through the link's MQTT sink (acknowledged after PUBACK)
        self.drainer = Drainer(agent.outbox, self.link.sink, interval_s=cfg.drain_interval_s) if drain else None
        self.fl = device_fl(self.client, device.device_id, device.group or "default", cfg.state_dir,
                            self._package, self._dataset, self._count)

    def _head_package(self) -> Path | None:
        """The directory of the served version whose manifest declares a trainable head, if any."""
        for name in self.agent.served():
            model = self.agent.model(name)
            if model.manifest.trainable_head:
                return Path(model.path)
        return None

    def _package(self) -> Path:
        path = self._head_package()
        if path is None:
            from edge_agent.training import TrainingError

            raise TrainingError("no served model declares a trainable_head")
        return path

    def _dataset(self) -> Any:
        cfg = self.agent.config
        if cfg.dataset_dir:
            from edge_agent.training import load_dataset_dir

            return load_dataset_dir(cfg.dataset_dir)
        return self.agent.samples.dataset()

    def _count(self) -> int:
        """Samples on offer; 0 (no check-in) while no served model has a head to train."""
        if self._head_package() is None:
            return 0
        return len(self._dataset()) if self.agent.config.dataset_dir else self.agent.samples.count()

    def start(self) -> AgentLink:
        self.link.start()
        if self.drainer is not None:
            self.drainer.start()
        return self

    def stop(self) -> None:
        if self.drainer is not None:
            self.drainer.stop()
        self.fl.stop()
        self.link.stop()
