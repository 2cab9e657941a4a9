"""Local training hyper-parameters, as sent by the aggregator in a round's config (torch-free)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pocketfleet.config import ConfigError, parse_config

from .errors import TrainingError


@dataclass
class TrainConfig:
    """SGD with momentum over mini-batches for `epochs` local epochs.

    mu > 0 adds FedProx's proximal term (mu/2)·||w - w_global||² to the local loss.
    `max_steps` bounds the work per round on a slow device (0 = no bound).
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    mu: float = 0.0
    max_steps: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "momentum": 0 <= self.momentum < 1,
            "weight_decay": self.weight_decay >= 0,
            "mu": self.mu >= 0,
            "max_steps": self.max_steps >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise TrainingError(f"train config: {name}={getattr(self, name)!r} is out of range")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TrainConfig:
        """From a round's JSON config (outside data): unknown keys and non-numbers are TrainingErrors."""
        try:
            config, _ = parse_config(cls, data or {}, "train config")
        except ConfigError as exc:
            raise TrainingError(str(exc)) from None
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
