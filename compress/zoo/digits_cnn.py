"""Workload `digits-cnn`: a small conv-BN-ReLU CNN on scikit-learn's 8x8 handwritten digits."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .digits_workload import DigitsWorkload

if TYPE_CHECKING:
    from torch import nn


class DigitsCNNWorkload(DigitsWorkload):
    name = "digits-cnn"
    arch = "DigitsCNN"
    description = "small CNN (2x[conv-BN-ReLU x2 + maxpool] -> linear) on sklearn's 8x8 digits"

    def default_config(self) -> dict[str, Any]:
        return {"channels": [32, 64], "num_classes": 10, "dropout": 0.1}

    def build(self, config: dict[str, Any] | None = None, pretrained: bool = True) -> nn.Module:
        from .cnn import DigitsCNN

        return DigitsCNN(config or self.default_config())
