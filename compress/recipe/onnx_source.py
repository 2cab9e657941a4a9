"""An existing ONNX file as an ExportableModel: the file run in onnxruntime is the reference, its inputs
are rows the user gives (or seeded random rows of the graph's shapes). Used to package an ONNX model made
by another tool with parity and sample outputs (`pocketfleet export model.onnx`, recipes with model.onnx)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.evaluate import Predict, num_rows, run_batched
from export.metrics import Metric, fidelity
from export.specs import TensorSpec


@dataclass
class OnnxSource:
    """An ONNX file with its rows; `module` is None (there is no PyTorch module to trace)."""

    path: Path
    name: str
    input_specs: list[TensorSpec]
    output_specs: list[TensorSpec]
    rows: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    metric: Metric | None = None
    preprocessing: str = ""
    module: Any = None
    workload_name: str | None = None
    _runtime: Any = field(default=None, repr=False)

    @classmethod
    def load(
        cls, path: str | Path, rows: dict[str, np.ndarray] | None = None, labels: np.ndarray | None = None,
        metric: Metric | None = None, name: str | None = None, batch: int = 4,
    ) -> OnnxSource:  # fmt: skip
        from export.runtimes import load_runtime

        from .user import example_arrays

        file = Path(path)
        runtime = load_runtime(file, format="onnx")
        inputs = [TensorSpec(s.name, ("batch", *_fixed(s.shape[1:], s.name)), s.dtype) for s in runtime.inputs]
        if rows is None:
            rows = example_arrays(inputs, batch)
        outputs = [TensorSpec(s.name, ("batch", *s.shape[1:]), s.dtype) for s in runtime.outputs]
        return cls(file, name or file.stem, inputs, outputs, rows, labels, metric, _runtime=runtime)

    @property
    def metric_name(self) -> str | None:
        return self.metric.name if self.metric is not None and self.labels is not None else "fidelity"

    def sample_inputs(self, n: int) -> dict[str, np.ndarray]:
        idx = np.arange(n) % num_rows(self.rows)
        return {k: np.ascontiguousarray(v[idx]) for k, v in self.rows.items()}

    def eval_inputs(self) -> dict[str, np.ndarray]:
        return dict(self.rows)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._runtime.run(inputs)

    def evaluate(self, predict: Predict | None = None) -> dict[str, Any]:
        predict = predict or self.predict
        outputs = run_batched(predict, self.rows, 32)[self.output_specs[0].name]
        if self.metric is not None and self.labels is not None:
            return self.metric.score(outputs, self.labels)
        reference = run_batched(self.predict, self.rows, 32)[self.output_specs[0].name]
        return {**fidelity(outputs, reference), "metric": "fidelity"}


def _fixed(dims: tuple[Any, ...], name: str) -> tuple[Any, ...]:
    """Non-batch dimensions of a graph input; a symbolic one (e.g. "sequence") stays a string."""
    return tuple(dims)
