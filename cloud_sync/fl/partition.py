"""Seeded non-IID splits of a labelled dataset over simulated devices (benchmarks and tests)."""

from __future__ import annotations

import numpy as np

from .errors import FLError


def dirichlet_split(labels: np.ndarray, devices: int, alpha: float, seed: int = 0, min_size: int = 2) -> list[np.ndarray]:
    """Per class, spread its samples over devices with proportions ~ Dirichlet(alpha); redrawn until
    every device holds at least `min_size` samples. Returns sorted index arrays, one per device."""
    labels = np.asarray(labels)
    if devices < 1 or alpha <= 0 or devices * min_size > len(labels):
        raise FLError(f"dirichlet split: {devices} devices, alpha {alpha}, {len(labels)} samples do not fit")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(devices)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(devices, alpha))) * len(idx)).astype(int)[:-1]
            for d, chunk in enumerate(np.split(idx, cuts)):
                parts[d].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise FLError(f"dirichlet split: no draw gave every device {min_size} samples")


def shard_split(labels: np.ndarray, devices: int, shards_per_device: int = 2, seed: int = 0) -> list[np.ndarray]:
    """McMahan et al.: sort by label, cut into devices x shards_per_device shards, deal them at random."""
    labels = np.asarray(labels)
    n_shards = devices * shards_per_device
    if n_shards > len(labels):
        raise FLError(f"shard split: {n_shards} shards for {len(labels)} samples")
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, n_shards)
    deal = rng.permutation(n_shards).reshape(devices, shards_per_device)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in deal]
