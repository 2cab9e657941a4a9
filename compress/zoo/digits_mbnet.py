"""Workload `digits-mbnet`: a MobileNetV2-style network (inverted residuals, depthwise convs) on the digits.

The config is JSON-able: `width` scales every channel count, `blocks` lists [expand, channels, repeats,
stride] stages, so a narrower or shallower student is just another config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .digits_workload import DigitsWorkload

if TYPE_CHECKING:
    from torch import nn

    from .digits_train import TrainConfig


class DigitsMobileNetWorkload(DigitsWorkload):
    name = "digits-mbnet"
    arch = "DigitsMobileNet"
    description = (
        "MobileNetV2-style net (ReLU6 inverted residuals, depthwise 3x3, BatchNorm) on the 8x8 digits"
    )

    def default_config(self) -> dict[str, Any]:
        return {
            "width": 1.0,
            "stem": 16,
            "blocks": [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 1], [6, 64, 2, 2]],
            "last": 128,
            "num_classes": 10,
            "dropout": 0.1,
            "divisor": 8,
        }

    def build(self, config: dict[str, Any] | None = None, pretrained: bool = True) -> nn.Module:
        from .mbnet import DigitsMobileNet

        return DigitsMobileNet(config or self.default_config())

    def train_config(self) -> TrainConfig:
        from .digits_train import TrainConfig

        return TrainConfig(epochs=40, label_smoothing=0.1, weight_decay=1e-3)
