"""Core ML runtime for `.mlpackage` directories or their zip (`export.coreml.zip_mlpackage`).

coremltools can run a model only on macOS. Elsewhere loading raises `RuntimeLoadError` saying so: a
Linux agent refuses a Core ML package at its health check instead of pretending to serve it. On macOS the
model is opened with `coremltools.models.MLModel` (CPU and Neural Engine) and `run` predicts one row at
a time (the programs are converted at a fixed batch of 1). This path has not been run by the test suite,
which runs on Linux.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from export.mlpackage import can_predict, unzip_mlpackage
from export.runtimes import Runtime, RuntimeLoadError, _first_line
from export.specs import TensorSpec


class CoreMLRuntime(Runtime):
    format = "coreml"
    _batch_free = True

    def __init__(self, path: Path, threads: int = 1) -> None:
        super().__init__(path, threads)
        if not can_predict():
            raise RuntimeLoadError(
                f"{path.name}: Core ML models run only on macOS/iOS (coremltools cannot predict on this host)"
            )
        try:
            import coremltools as ct
        except ImportError as exc:
            raise RuntimeLoadError(f"running Core ML models needs coremltools: {exc}") from exc
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        package = path
        if path.is_file() and zipfile.is_zipfile(path):
            self._tmp = tempfile.TemporaryDirectory(prefix="pf-coreml-")
            package = unzip_mlpackage(path, self._tmp.name)
        try:
            self.model = ct.models.MLModel(str(package), compute_units=ct.ComputeUnit.CPU_AND_NE)
        except Exception as exc:
            raise RuntimeLoadError(f"Core ML cannot load {path}: {_first_line(exc)}") from exc
        desc = self.model.get_spec().description
        self.inputs = [_spec(f) for f in desc.input]
        self.outputs = [_spec(f) for f in desc.output]

    def _invoke(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = next(iter(inputs.values())).shape[0]
        rows: list[dict[str, Any]] = []
        with self.lock:
            for i in range(batch):
                rows.append(self.model.predict({n: a[i : i + 1] for n, a in inputs.items()}))
        return {s.name: np.concatenate([np.asarray(r[s.name]) for r in rows], axis=0) for s in self.outputs}


def _spec(feature: Any) -> TensorSpec:
    arr = feature.type.multiArrayType
    dtype = {65568: "float32", 65552: "float16", 131104: "int32"}.get(int(arr.dataType), "float32")
    return TensorSpec(feature.name, tuple(int(d) for d in arr.shape) or ("dynamic",), dtype)
