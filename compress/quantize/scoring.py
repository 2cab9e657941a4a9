"""The workload metric on a (sub)split, for any predict callable or model file (sensitivity, max_drop).

top-1 workloads are scored against their labels; embedding workloads (cosine) against the fp32 model's
own outputs on the same rows, with the same functions the workloads use (export.evaluate).
Other metrics fall back to the workload's own evaluation on the whole split.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from export.evaluate import embedding_fidelity, pick_output, run_batched, top1_accuracy

Predict = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class Scorer:
    def __init__(
        self, loaded: Any, split: str = "val", samples: int = 0, batch_size: int = 32, threads: int = 1
    ):
        self.loaded, self.split, self.batch_size, self.threads = loaded, split, batch_size, threads
        wl = loaded.workload
        inputs, labels = wl.data(split)
        n = len(next(iter(inputs.values())))
        take = min(samples, n) if samples else n
        self.inputs = {k: v[:take] for k, v in inputs.items()}
        self.labels = labels[:take] if labels is not None else None
        self.samples = take
        self.output = wl.outputs[0].name
        self.metric = wl.metric.name
        self.higher_is_better = wl.metric.higher_is_better
        self._reference: np.ndarray | None = None

    def reference(self) -> np.ndarray:
        if self._reference is None:
            out = run_batched(self.loaded.predict, self.inputs, self.batch_size)
            self._reference = pick_output(out, self.output)
        return self._reference

    def score_predict(self, predict: Predict) -> float:
        if self.metric == "top1" and self.labels is not None:
            logits = pick_output(run_batched(predict, self.inputs, self.batch_size), self.output)
            return float(top1_accuracy(logits, self.labels)["value"])
        if self.metric == "cosine":
            emb = pick_output(run_batched(predict, self.inputs, self.batch_size), self.output)
            return float(embedding_fidelity(emb, self.reference())["value"])
        return float(
            self.loaded.workload.evaluate(predict, batch_size=self.batch_size, split=self.split)["value"]
        )

    def __call__(self, path: Path) -> float:
        from export.runtimes import load_runtime

        return self.score_predict(load_runtime(path, threads=self.threads).run)


class CachedPredict:
    """A predict callable that remembers its outputs per input row (the fp32 reference is asked for the
    same evaluation rows by parity checks and metrics of every artifact)."""

    def __init__(self, predict: Predict) -> None:
        self.predict = predict
        self.cache: dict[bytes, dict[str, np.ndarray]] = {}

    def _key(self, inputs: dict[str, np.ndarray], i: int) -> bytes:
        return b"|".join(np.ascontiguousarray(inputs[k][i]).tobytes() for k in sorted(inputs))

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(next(iter(inputs.values())))
        keys = [self._key(inputs, i) for i in range(n)]
        missing = sorted({i for i, k in enumerate(keys) if k not in self.cache})
        if missing:
            out = self.predict({k: v[missing] for k, v in inputs.items()})
            for j, i in enumerate(missing):
                self.cache[keys[i]] = {name: value[j] for name, value in out.items()}
        first = self.cache[keys[0]]
        return {name: np.stack([self.cache[k][name] for k in keys]) for name in first}
