"""The user's data as arrays, and calibration data checks: names, shapes, dtypes, emptiness and NaN/inf,
against the model's inputs.

Calibration data may be an array or tensor (one-input models), a dict name -> array, a list of those
(batches, concatenated), or any iterable / `torch.utils.data.DataLoader` yielding tensors, dicts or
`(inputs, targets)` batches. Evaluation data is `(inputs, labels)` or an iterable of such batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from export.specs import TensorSpec

from .errors import CalibrationDataError

CalibData = Mapping[str, Any] | np.ndarray | Sequence[Mapping[str, Any]] | Iterable[Any]


def _array(value: Any, what: str) -> np.ndarray:
    """A numpy array from an array, a torch tensor or a nested list (torch is never imported here)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise CalibrationDataError(f"{what} is not an array: {exc}") from None
    if arr.dtype == object or arr.ndim == 0:
        raise CalibrationDataError(
            f"{what} must be an array or tensor with a batch dimension, got {type(value).__name__}"
            + (f" of dtype {arr.dtype}" if arr.dtype == object else "")
        )
    if arr.dtype.kind not in "biuf":
        raise CalibrationDataError(f"{what} has dtype {arr.dtype}; expected a numeric array")
    return arr


def _is_tensor(value: Any) -> bool:
    return isinstance(value, np.ndarray) or hasattr(value, "detach") or hasattr(value, "__array__")


def _split_batch(batch: Any, n_inputs: int | None) -> tuple[Any, Any]:
    """(inputs, targets or None) of one batch: a tensor/array, a dict, or a tuple/list holding the inputs
    and optionally the targets last (a DataLoader over TensorDataset(x, y) yields [x, y])."""
    if _is_tensor(batch) or isinstance(batch, Mapping):
        return batch, None
    if isinstance(batch, (tuple, list)):
        items = list(batch)
        if not items:
            raise CalibrationDataError("a data batch is an empty tuple")
        if isinstance(items[0], Mapping):  # (dict of inputs, targets)
            return items[0], items[1] if len(items) > 1 else None
        if isinstance(items[0], (tuple, list)):  # ((x1, x2), targets)
            return tuple(items[0]), items[1] if len(items) > 1 else None
        n = n_inputs or 1
        if len(items) == n:
            return (items[0] if n == 1 else tuple(items)), None
        if len(items) == n + 1:
            return (items[0] if n == 1 else tuple(items[:n])), items[n]
        raise CalibrationDataError(
            f"a data batch holds {len(items)} tensors but the model takes {n} input(s) (plus optional targets)"
        )
    raise CalibrationDataError(
        f"a data batch must be a tensor, an array, a dict name -> array or a tuple (inputs, targets), "
        f"got {type(batch).__name__}"
    )


def _named(inputs: Any, names: Sequence[str] | None, what: str) -> dict[str, np.ndarray]:
    if isinstance(inputs, Mapping):
        return {str(k): _array(v, f"{what} {k!r}") for k, v in inputs.items()}
    items = list(inputs) if isinstance(inputs, tuple) else [inputs]
    if names is None:
        names = ["input"] if len(items) == 1 else [f"input_{i}" for i in range(len(items))]
    if len(names) != len(items):
        raise CalibrationDataError(f"{what} has {len(items)} tensor(s) but the model takes {list(names)}")
    return {n: _array(v, f"{what} {n!r}") for n, v in zip(names, items, strict=True)}


def collect_rows(
    data: Any, names: Sequence[str] | None = None, what: str = "calibration data", limit: int | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """({input name: array}, targets or None) from any of the accepted data forms, batches concatenated.
    `names` are the model's input names when known (a single array or a tuple is named by them, else
    "input" / "input_0", ...); `limit` stops drawing batches from an iterable once that many rows are in."""
    n_inputs = len(names) if names is not None else None
    if _is_tensor(data) or isinstance(data, (Mapping, tuple)):
        inputs, targets = _split_batch(data, n_inputs)
        arrays = _named(inputs, names, what)
        return arrays, _array(targets, f"{what} targets") if targets is not None else None
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise CalibrationDataError(
            f"{what} must be an array, a dict name -> array, a list of batches or an iterable / DataLoader of "
            f"batches, got {type(data).__name__}"
        )
    parts: list[dict[str, np.ndarray]] = []
    targets: list[np.ndarray] = []
    rows = 0
    for i, batch in enumerate(data):
        inputs, y = _split_batch(batch, n_inputs)
        part = _named(inputs, names, f"{what} batch {i}")
        if parts and list(part) != list(parts[0]):
            raise CalibrationDataError(f"{what} batch {i} names inputs {list(part)}, batch 0 {list(parts[0])}")
        parts.append(part)
        if y is not None:
            targets.append(_array(y, f"{what} batch {i} targets"))
        rows += len(next(iter(part.values())))
        if limit is not None and rows >= limit:
            break
    if not parts:
        raise CalibrationDataError(f"{what} is empty (no batches)")
    out: dict[str, np.ndarray] = {}
    for name in parts[0]:
        shapes = {tuple(p[name].shape[1:]) for p in parts}
        if len(shapes) > 1:
            raise CalibrationDataError(
                f"{what}: batches of input {name!r} disagree on the row shape: {sorted(map(list, shapes))}"
            )
        out[name] = np.concatenate([p[name] for p in parts])
    labels = None
    if targets:
        if len(targets) != len(parts):
            raise CalibrationDataError(f"{what}: some batches have targets and some do not")
        labels = np.concatenate(targets)
    if limit is not None:
        out = {k: v[:limit] for k, v in out.items()}
        labels = labels[:limit] if labels is not None else None
    return out, labels


def collect_eval(
    data: Any, names: Sequence[str] | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Evaluation data as ({input name: array}, labels or None): `(inputs, labels)` (labels may be None)
    or an iterable of batches."""
    if isinstance(data, tuple) and len(data) == 2 and not (
        names is not None and len(names) == 2 and _is_tensor(data[0]) and _is_tensor(data[1])
        and len(np.shape(data[1])) > 1
    ):
        inputs, labels = data
        arrays = _named(inputs if not isinstance(inputs, list) else tuple(inputs), names, "eval_data inputs")
        lab = _array(labels, "eval_data labels") if labels is not None else None
        rows = {len(a) for a in arrays.values()}
        if lab is not None:
            rows.add(len(lab))
        if len(rows) != 1:
            raise CalibrationDataError(f"eval_data inputs and labels disagree on the number of rows: {sorted(rows)}")
        return arrays, lab
    return collect_rows(data, names, "eval_data")


def infer_specs(arrays: Mapping[str, np.ndarray]) -> list[TensorSpec]:
    """Input specs read off arrays themselves (batch dimension dynamic)."""
    return [TensorSpec(n, ("batch", *a.shape[1:]), str(a.dtype)) for n, a in arrays.items()]


def check_calib_data(data: CalibData, inputs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Return calibration inputs as {name: array} with a shared leading batch dimension, or raise
    CalibrationDataError naming the input and the problem. Accepts a dict of arrays, a single array (for
    a one-input model) or a list of such dicts (concatenated)."""
    specs = {s.name: s for s in inputs}
    names = [s.name for s in inputs]
    if hasattr(data, "detach"):  # a torch tensor
        data = data.detach().cpu().numpy()
    if isinstance(data, Mapping):
        data = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in data.items()}
    elif isinstance(data, np.ndarray) or (hasattr(data, "shape") and hasattr(data, "__array__")):
        if len(specs) != 1:
            raise CalibrationDataError(
                f"calibration data is a single array but the model has {len(specs)} inputs {sorted(specs)}: pass a dict"
            )
        data = {names[0]: np.asarray(data)}
    elif isinstance(data, list):
        if not data:
            raise CalibrationDataError("the calibration set is empty (an empty list of batches)")
        parts = [check_calib_data(d if not isinstance(d, list) else tuple(d), inputs) for d in data]
        return {name: np.concatenate([p[name] for p in parts]) for name in specs}
    elif isinstance(data, (str, bytes)):
        raise CalibrationDataError(f"calibration data must be arrays, got {type(data).__name__}")
    elif isinstance(data, (tuple, Iterable)):  # (inputs, targets), an iterable or a DataLoader of batches
        data = collect_rows(data, names)[0]
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
