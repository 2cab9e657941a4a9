"""DigitsMobileNet: a MobileNetV2-style network (inverted residuals, depthwise convs, BatchNorm, ReLU6)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a scaled channel count to a multiple of `divisor` (MobileNetV2 rule: never drop > 10%)."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


def conv_bn(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when expand == 1) -> 3x3 depthwise -> 1x1 linear project, + skip when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1))
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class DigitsMobileNet(nn.Module):
    """config: {"width": multiplier, "stem": channels, "blocks": [[expand, channels, repeats, stride], ...],
    "last": channels of the final 1x1 conv, "num_classes": 10, "dropout": p, "divisor": 8}.
    Channel counts are multiplied by `width` and rounded with `make_divisible`.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        width, divisor = float(config.get("width", 1.0)), int(config.get("divisor", 8))

        def ch(c: int) -> int:
            return make_divisible(c * width, divisor)

        cin = ch(config["stem"])
        layers: list[nn.Module] = [conv_bn(1, cin, 3)]
        for expand, channels, repeats, stride in config["blocks"]:
            cout = ch(channels)
            for i in range(int(repeats)):
                layers.append(InvertedResidual(cin, cout, int(stride) if i == 0 else 1, int(expand)))
                cin = cout
        last = ch(config["last"]) if width > 1.0 else int(config["last"])
        layers.append(conv_bn(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(float(config.get("dropout", 0.0)))
        self.classifier = nn.Linear(last, int(config["num_classes"]))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.flatten(self.pool(self.features(image)), 1)))
