"""User-style models (written the way a user would, not by pocketfleet): the factories that the BYOM docs,
the recipe example, the benchmark and the tests use. Each `make_*` returns a plain `nn.Module`."""

from __future__ import annotations

import torch
from torch import nn


class SequenceClassifier(nn.Module):
    """Embedding -> GRU (or LSTM) -> linear over the last hidden state; input token ids [batch, seq]."""

    def __init__(self, vocab: int = 100, dim: int = 32, classes: int = 4, cell: str = "gru") -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = (nn.GRU if cell == "gru" else nn.LSTM)(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(ids))
        return self.head(out[:, -1])


class KeywordSpotter(nn.Module):
    """1-D conv keyword spotter on [batch, mel bins, frames] features."""

    def __init__(self, mels: int = 20, classes: int = 12, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = mels
        for _ in range(3):
            layers += [nn.Conv1d(c, width, 3, padding=1), nn.BatchNorm1d(width), nn.ReLU()]
            c = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=2))


class TwoTower(nn.Module):
    """Two inputs (an image and a feature vector), two outputs (class logits and a regression value)."""

    def __init__(self, features: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.mlp = nn.Sequential(nn.Linear(features, 16), nn.ReLU())
        self.cls = nn.Linear(32, classes)
        self.reg = nn.Linear(32, 1)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.cat([self.conv(image), self.mlp(extra)], dim=1)
        return self.cls(h), self.reg(h)


class TinyUNet(nn.Module):
    """A two-level U-Net segmenter: [batch, 3, H, W] -> per-pixel class logits [batch, classes, H, W]."""

    def __init__(self, classes: int = 3, width: int = 16) -> None:
        super().__init__()

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())

        self.down1, self.down2 = block(3, width), block(width, 2 * width)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec = block(2 * width, width)
        self.out = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.down1(x)
        b = self.down2(self.pool(a))
        return self.out(self.dec(torch.cat([a, self.up(b)], dim=1)))


def make_gru(**kw: object) -> nn.Module:
    return SequenceClassifier(cell="gru", **kw)  # type: ignore[arg-type]


def make_lstm(**kw: object) -> nn.Module:
    return SequenceClassifier(cell="lstm", **kw)  # type: ignore[arg-type]


def make_kws(**kw: object) -> nn.Module:
    return KeywordSpotter(**kw)  # type: ignore[arg-type]


def make_two_tower(**kw: object) -> nn.Module:
    return TwoTower(**kw)  # type: ignore[arg-type]


def make_unet(**kw: object) -> nn.Module:
    return TinyUNet(**kw)  # type: ignore[arg-type]


def make_mobilenet_v2(classes: int = 10, image_size: int = 32) -> nn.Module:
    """A small transformers MobileNetV2 (random init, no download) returning logits only."""
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    cfg = MobileNetV2Config(num_channels=1, image_size=image_size, depth_multiplier=0.35, num_labels=classes,
                            min_depth=8)
    return LogitsOnly(MobileNetV2ForImageClassification(cfg))


class LogitsOnly(nn.Module):
    """Wrap a transformers model so that forward returns the logits tensor (export needs tensors)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits
