"""Training a dense head over backbone features in NumPy (no torch on the device).

The head's schema and math (`export.head.Head`: layers, manifest entry, forward, gradients) live in the
artifact layer, where packages declare it; this module trains it: mini-batch SGD with momentum, weight
decay and FedProx, softmax cross-entropy on the logits.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from export.errors import HeadError
from export.head import HEAD_SCHEMA, DenseLayer, Head, Weights

from .config import TrainConfig
from .errors import TrainingError

__all__ = ["HEAD_SCHEMA", "DenseLayer", "Head", "TrainResult", "Weights", "train_head"]


@dataclass
class TrainResult:
    """Trained weights and what the aggregator needs to weigh them."""

    weights: Weights
    num_samples: int
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)


def train_head(
    head: Head,
    weights: Mapping[str, np.ndarray],
    features: np.ndarray,
    labels: np.ndarray,
    config: TrainConfig,
) -> TrainResult:
    """Train the head from `weights` (the global model) on local features; FedProx when config.mu > 0."""
    x = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(x) == 0 or len(x) != len(y):
        raise TrainingError(f"head training: {len(x)} feature rows for {len(y)} labels")
    try:
        head.check(weights, in_dim=x.shape[1])
    except HeadError as exc:
        raise TrainingError(str(exc)) from None
    classes = weights[head.layers[-1].weight].shape[0]
    if y.min() < 0 or y.max() >= classes:
        raise TrainingError(f"head training: labels must lie in [0, {classes}), got [{y.min()}, {y.max()}]")
    anchor = {k: np.asarray(weights[k], dtype=np.float32) for k in head.names}
    w = {k: v.copy() for k, v in anchor.items()}
    velocity = {k: np.zeros_like(v) for k, v in w.items()}
    rng = np.random.default_rng(config.seed)
    start, steps, losses = time.perf_counter(), 0, []
    for _ in range(config.epochs):
        order = rng.permutation(len(y))
        for i in range(0, len(order), config.batch_size):
            idx = order[i : i + config.batch_size]
            loss, grads = head.loss_and_grads(w, x[idx], y[idx])
            losses.append(loss)
            for k, g in grads.items():
                if config.weight_decay:
                    g = g + config.weight_decay * w[k]
                if config.mu:
                    g = g + config.mu * (w[k] - anchor[k])
                velocity[k] = config.momentum * velocity[k] + g.astype(np.float32)
                w[k] -= config.lr * velocity[k]
            steps += 1
            if config.max_steps and steps >= config.max_steps:
                break
        if config.max_steps and steps >= config.max_steps:
            break
    acc = float((head.predict(w, x) == y).mean())
    metrics = {
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "train_accuracy": acc,
        "train_seconds": time.perf_counter() - start,
    }
    return TrainResult(w, len(y), steps, metrics)
