"""scikit-learn's bundled handwritten digits with a fixed, seeded, stratified 60/20/20 split."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .base import check_split

SPLIT_SEED = 20240601  # fixed: every model and every helper sees the same split


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]  # [N,1,8,8] in [0,1]
    labels = bunch.target.astype(np.int64)
    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=0.2, stratify=labels, random_state=SPLIT_SEED)
    train, val = train_test_split(rest, test_size=0.25, stratify=labels[rest], random_state=SPLIT_SEED)
    split_idx = {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
    for arr in (images, labels, *split_idx.values()):
        arr.setflags(write=False)
    return images, labels, split_idx


def split_indices(split: str) -> np.ndarray:
    """Indices into the full 1,797-image set for `split` ("train", "val" or "test")."""
    return _load()[2][check_split(split)]


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [n,1,8,8] = pixels/16, labels int64 [n]) of one split (fresh copies)."""
    images, labels, split_idx = _load()
    idx = split_idx[check_split(split)]
    return images[idx].copy(), labels[idx].copy()


def digits_all() -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [1797,1,8,8] = pixels/16, labels int64 [1797]) in scikit-learn's order (copies)."""
    images, labels, _ = _load()
    return images.copy(), labels.copy()
