"""The metric a quantized candidate is judged by (sensitivity, max_drop, QAT), for any predict callable or
model file, on fixed rows.

Three cases, one class: labels and a metric (the user's `eval_data` and `metric`, or a reference workload's
split) score `metric(outputs, labels)`; a metric without labels scores `metric(outputs, float outputs)`
(e.g. cosine of embeddings to the float model's); no metric scores fidelity to the float model's own
outputs (export.metrics.fidelity: top-1 agreement for [batch, classes] outputs, else cosine). Never skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from export.evaluate import pick_output, run_batched
from export.metrics import Metric, fidelity

Predict = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class Scorer:
    """`score_predict(predict) -> float` and `scorer(path) -> float`: the metric on `inputs`."""

    def __init__(
        self,
        inputs: dict[str, np.ndarray],
        labels: np.ndarray | None,
        metric: Metric | None,
        reference: Predict,
        output: str,
        batch_size: int = 32,
        threads: int = 1,
        split: str = "eval",
    ) -> None:
        self.inputs, self.labels, self.reference_predict = inputs, labels, reference
        self.output, self.batch_size, self.threads, self.split = output, batch_size, threads, split
        self.samples = len(next(iter(inputs.values())))
        self._metric = metric
        self.metric = metric.name if metric is not None else "fidelity"
        self.higher_is_better = metric.higher_is_better if metric is not None else True
        self._reference: np.ndarray | None = None

    def reference(self) -> np.ndarray:
        if self._reference is None:
            out = run_batched(self.reference_predict, self.inputs, self.batch_size)
            self._reference = pick_output(out, self.output)
        return self._reference

    def report(self, predict: Predict) -> dict[str, Any]:
        """The metric as a dict ({"metric", "value", "n", ...})."""
        out = pick_output(run_batched(predict, self.inputs, self.batch_size), self.output)
        if self._metric is None:
            return fidelity(out, self.reference())
        target = self.labels if self.labels is not None else self.reference()
        return self._metric.score(out, target)

    def score_predict(self, predict: Predict) -> float:
        return float(self.report(predict)["value"])

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
