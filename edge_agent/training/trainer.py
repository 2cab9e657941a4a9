"""Head training on a deployed package: backbone features from the inference runtime, head in NumPy.

    trainer = HeadTrainer.from_package_dir(extracted_dir)        # manifest with a trainable_head
    result = trainer.fit(global_head_weights, dataset, TrainConfig(epochs=2, mu=0.01))
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from export.head import Head, Weights

from .config import TrainConfig
from .dataset import LocalDataset
from .errors import TrainingError
from .head import TrainResult, train_head

FEATURES = "features"


def compute_features(runtime: Any, inputs: Mapping[str, np.ndarray], output: str, batch_size: int = 256) -> np.ndarray:
    """Run `runtime` (export.runtimes.Runtime) over `inputs` in batches; return output `output`."""
    names = [s.name for s in runtime.inputs]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise TrainingError(f"features: dataset lacks model input(s) {missing}; it holds {sorted(inputs)}")
    n = len(inputs[names[0]])
    parts = []
    for i in range(0, n, batch_size):
        out = runtime.run({k: inputs[k][i : i + batch_size] for k in names})
        if output not in out:
            raise TrainingError(f"features: the model has no output {output!r}; it has {sorted(out)}")
        parts.append(np.asarray(out[output], dtype=np.float32).reshape(len(out[output]), -1))
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


class HeadTrainer:
    """Trains a package's head on local data. Features are cached per dataset (the backbone is frozen)."""

    def __init__(self, head: Head, runtime: Any = None, initial: Weights | None = None):
        self.head, self.runtime, self.initial = head, runtime, initial
        self._cache: dict[int, tuple[LocalDataset, np.ndarray]] = {}

    @classmethod
    def from_package_dir(cls, path: str | Path, threads: int = 1) -> HeadTrainer:
        """From an extracted, verified package directory (manifest.json + model + head weights)."""
        from safetensors.numpy import load_file

        from export.runtimes import load_runtime

        path = Path(path)
        manifest = json.loads((path / "manifest.json").read_text())
        entry = manifest.get("trainable_head")
        if not entry:
            raise TrainingError(f"{path}: the package declares no trainable_head")
        head = Head.from_manifest(entry)
        initial = load_file(str(path / head.weights_file)) if head.weights_file else None
        return cls(head, load_runtime(path / manifest["model"], threads=threads), initial)

    def features(self, dataset: LocalDataset) -> np.ndarray:
        """Backbone features of every sample: the dataset's own `features` array, else the runtime's."""
        if FEATURES in dataset.arrays and (self.runtime is None or FEATURES not in {s.name for s in self.runtime.inputs}):
            return dataset.arrays[FEATURES].reshape(len(dataset), -1).astype(np.float32)
        hit = self._cache.get(id(dataset))
        if hit is not None and hit[0] is dataset:
            return hit[1]
        if self.runtime is None:
            raise TrainingError("head training: the dataset has no 'features' array and no runtime is loaded")
        feats = compute_features(self.runtime, dataset.arrays, self.head.features)
        self._cache = {id(dataset): (dataset, feats)}
        return feats

    def fit(self, weights: Mapping[str, np.ndarray] | None, dataset: LocalDataset, config: TrainConfig) -> TrainResult:
        weights = weights if weights is not None else self.initial
        if weights is None:
            raise TrainingError("head training: no head weights (none sent and none in the package)")
        return train_head(self.head, weights, self.features(dataset), dataset.labels, config)

    def accuracy(self, weights: Mapping[str, np.ndarray], dataset: LocalDataset) -> float:
        return float((self.head.predict(weights, self.features(dataset)) == dataset.labels).mean())
