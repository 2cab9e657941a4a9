"""DigitsCNN: a small conv-BN-ReLU network for 8x8 digit images."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DigitsCNN(nn.Module):
    """Stages of two conv-BN-ReLU blocks, each stage followed by 2x2 max pooling; flatten -> linear.

    config: {"channels": [c1, c2, ...] (one per stage), "num_classes": 10, "dropout": p}.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, side = 1, 8
        for cout in config["channels"]:
            layers += _block(cin, cout) + _block(cout, cout) + [nn.MaxPool2d(2)]
            cin, side = cout, side // 2
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(float(config.get("dropout", 0.0)))
        self.classifier = nn.Linear(cin * side * side, int(config["num_classes"]))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.flatten(self.features(image), 1)))
