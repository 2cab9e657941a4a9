"""Calibration data checks: names, shapes, dtypes, emptiness and NaN/inf, against the workload's inputs."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from export.specs import TensorSpec

from .errors import CalibrationDataError

CalibData = Mapping[str, Any] | np.ndarray | Sequence[Mapping[str, Any]]


def check_calib_data(data: CalibData, inputs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Return calibration inputs as {name: array} with a shared leading batch dimension, or raise
    CalibrationDataError naming the input and the problem. Accepts a dict of arrays, a single array (for
    a one-input model) or a list of such dicts (concatenated)."""
    specs = {s.name: s for s in inputs}
    if isinstance(data, np.ndarray) or (hasattr(data, "shape") and not isinstance(data, Mapping)):
        if len(specs) != 1:
            raise CalibrationDataError(
                f"calibration data is a single array but the model has {len(specs)} inputs {sorted(specs)}: pass a dict"
            )
        data = {next(iter(specs)): np.asarray(data)}
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        if not data:
            raise CalibrationDataError("the calibration set is empty (an empty list of batches)")
        parts = [check_calib_data(d, inputs) for d in data]
        return {name: np.concatenate([p[name] for p in parts]) for name in specs}
    if not isinstance(data, Mapping):
        raise CalibrationDataError(
            f"calibration data must be a dict of input name -> array, got {type(data).__name__}"
        )
    unknown = sorted(set(data) - set(specs))
    if unknown:
        raise CalibrationDataError(
            f"calibration data has unknown input {unknown[0]!r}; the model takes {sorted(specs)}"
        )
    missing = sorted(set(specs) - set(data))
    if missing:
        raise CalibrationDataError(
            f"calibration data lacks input {missing[0]!r}; the model takes {sorted(specs)}"
        )
    out: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        out[name] = _check_one(name, spec, np.asarray(data[name]))
    rows = {name: len(a) for name, a in out.items()}
    if len(set(rows.values())) > 1:
        raise CalibrationDataError(f"calibration inputs disagree on the number of rows: {rows}")
    return out


def _check_one(name: str, spec: TensorSpec, arr: np.ndarray) -> np.ndarray:
    want = list(spec.shape)
    if arr.ndim != len(want):
        raise CalibrationDataError(
            f"calibration input {name!r} has shape {list(arr.shape)}; expected {len(want)} dimensions {want}"
        )
    if arr.shape[0] == 0:
        raise CalibrationDataError(f"the calibration set is empty: input {name!r} has 0 rows")
    for axis, (dim, got) in enumerate(zip(want, arr.shape, strict=True)):
        if axis > 0 and isinstance(dim, int) and dim != got:
            raise CalibrationDataError(
                f"calibration input {name!r} has shape {list(arr.shape)}; expected {want} (dimension {axis} is {got}, not {dim})"
            )
    kind = np.dtype(spec.dtype).kind
    if kind == "f":
        if arr.dtype.kind not in "fiu":
            raise CalibrationDataError(
                f"calibration input {name!r} has dtype {arr.dtype}, expected {spec.dtype}"
            )
        arr = arr.astype(np.dtype(spec.dtype), copy=False)
        bad = ~np.isfinite(arr)
        if bad.any():
            rows = np.unique(np.nonzero(bad.reshape(len(arr), -1))[0])
            raise CalibrationDataError(
                f"calibration input {name!r} holds {int(bad.sum())} NaN/inf value(s), first in row {int(rows[0])} "
                f"({len(rows)} row(s) affected)"
            )
    elif kind in "iu":
        if arr.dtype.kind not in "iu":
            raise CalibrationDataError(
                f"calibration input {name!r} has dtype {arr.dtype}, expected integer {spec.dtype}"
            )
        arr = arr.astype(np.dtype(spec.dtype), copy=False)
    return np.ascontiguousarray(arr)


def batches(data: Mapping[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive row batches of a dict of arrays."""
    n = len(next(iter(data.values())))
    for start in range(0, n, batch_size):
        yield {k: v[start : start + batch_size] for k, v in data.items()}
