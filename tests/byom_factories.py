"""Model factories for the bring-your-own-model tests: good ones and the mistakes users make."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def tiny(classes: int = 3, features: int = 6) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))


def needs_width(width: int) -> nn.Module:
    return nn.Linear(width, 2)


def not_a_module() -> object:
    return {"weights": [1, 2, 3]}


def broken() -> nn.Module:
    raise RuntimeError("CUDA is required")


NOT_CALLABLE = 3


def half_top1(outputs: np.ndarray, labels: np.ndarray) -> float:
    """A user metric ('module:function' in a recipe)."""
    return float((outputs.argmax(1) == labels).mean()) / 2
