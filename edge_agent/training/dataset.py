"""Local training data on the device: a directory of array files, or labelled samples in SQLite.

Directory layout: any number of `*.npz` or `*.safetensors` files, each holding one array per model
input (or a `features` array of precomputed backbone features) and a `label` array of integer class
ids, all with the same leading dimension. Files are read in name order and concatenated. Nothing is
unpickled (`np.load(..., allow_pickle=False)`).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DatasetError

LABEL = "label"
MAX_FILE_BYTES = 1 << 30


@dataclass
class LocalDataset:
    """Input arrays by name (leading dim = sample) and int64 labels."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.labels)
        for name, arr in self.arrays.items():
            if len(arr) != n:
                raise DatasetError(f"dataset: array {name!r} has {len(arr)} rows, labels have {n}")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> LocalDataset:
        return LocalDataset({k: v[idx] for k, v in self.arrays.items()}, self.labels[idx])

    @staticmethod
    def concat(parts: list[LocalDataset]) -> LocalDataset:
        if not parts:
            raise DatasetError("dataset: nothing to concatenate")
        names = set(parts[0].arrays)
        for p in parts[1:]:
            if set(p.arrays) != names:
                raise DatasetError(f"dataset: parts hold different arrays ({sorted(names)} vs {sorted(p.arrays)})")
        arrays = {k: np.concatenate([p.arrays[k] for p in parts]) for k in sorted(names)}
        return LocalDataset(arrays, np.concatenate([p.labels for p in parts]))


def _read_file(path: Path) -> dict[str, np.ndarray]:
    if path.stat().st_size > MAX_FILE_BYTES:
        raise DatasetError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        from safetensors.numpy import load_file

        return load_file(str(path))
    except Exception as exc:  # any reader failure is a bad file for the user
        raise DatasetError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc


def _as_dataset(arrays: Mapping[str, np.ndarray], where: str) -> LocalDataset:
    arrays = dict(arrays)
    labels = arrays.pop(LABEL, None)
    if labels is None:
        raise DatasetError(f"{where}: no {LABEL!r} array")
    if labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise DatasetError(f"{where}: {LABEL!r} must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if not arrays:
        raise DatasetError(f"{where}: no input arrays besides {LABEL!r}")
    for name, arr in arrays.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise DatasetError(f"{where}: array {name!r} holds NaN or infinity")
    try:
        return LocalDataset(arrays, labels.astype(np.int64))
    except DatasetError as exc:
        raise DatasetError(f"{where}: {exc}") from exc


def load_dataset_dir(path: str | Path) -> LocalDataset:
    """Read every *.npz / *.safetensors file under `path` (not recursive) into one dataset."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"dataset directory {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".safetensors") and p.is_file())
    if not files:
        raise DatasetError(f"dataset directory {path} holds no .npz or .safetensors files")
    return LocalDataset.concat([_as_dataset(_read_file(f), str(f)) for f in files])


def save_dataset_file(path: str | Path, dataset: LocalDataset) -> Path:
    """Write a dataset as one safetensors file that `load_dataset_dir` reads back."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in dataset.arrays.items()}
    tensors[LABEL] = np.ascontiguousarray(dataset.labels.astype(np.int64))
    save_file(tensors, str(path))
    return path


class SampleStore:
    """Labelled samples posted to the agent (e.g. `POST /v1/samples`), kept in SQLite (WAL).

    Each row holds one sample's input arrays (safetensors bytes, no batch dim) and its label.
    Every sample must have the same array names, shapes and dtypes as the first one stored.
    """

    def __init__(self, path: str | Path, max_samples: int = 100_000, max_sample_bytes: int = 4 << 20):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_samples, self.max_sample_bytes = max_samples, max_sample_bytes
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS samples (id INTEGER PRIMARY KEY, created REAL, label INTEGER, "
            "signature TEXT, tensors BLOB)"
        )

    def close(self) -> None:
        self.db.close()

    @staticmethod
    def _signature(inputs: Mapping[str, np.ndarray]) -> str:
        return ";".join(f"{k}:{v.dtype.str}:{'x'.join(map(str, v.shape))}" for k, v in sorted(inputs.items()))

    def add(self, inputs: Mapping[str, np.ndarray], label: int) -> int:
        """Store one labelled sample; returns its id. Raises DatasetError on a mismatched sample."""
        from safetensors.numpy import save

        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 0:
            raise DatasetError(f"sample: label must be an integer >= 0, got {label!r}")
        if not inputs:
            raise DatasetError("sample: no input arrays")
        arrays = {str(k): np.ascontiguousarray(np.asarray(v)) for k, v in inputs.items()}
        for k, v in arrays.items():
            if v.dtype.kind not in "fiub" or (v.dtype.kind == "f" and not np.isfinite(v).all()):
                raise DatasetError(f"sample: array {k!r} must be finite numbers, got dtype {v.dtype}")
        sig = self._signature(arrays)
        row = self.db.execute("SELECT signature FROM samples ORDER BY id LIMIT 1").fetchone()
        if row and row[0] != sig:
            raise DatasetError(f"sample: arrays {sig} differ from the stored samples' {row[0]}")
        blob = save(arrays)
        if len(blob) > self.max_sample_bytes:
            raise DatasetError(f"sample: {len(blob)} bytes, more than the limit of {self.max_sample_bytes}")
        if self.count() >= self.max_samples:
            raise DatasetError(f"sample store is full ({self.max_samples} samples)")
        cur = self.db.execute(
            "INSERT INTO samples (created, label, signature, tensors) VALUES (?, ?, ?, ?)",
            (time.time(), int(label), sig, blob),
        )
        return int(cur.lastrowid)

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])

    def dataset(self, limit: int | None = None) -> LocalDataset:
        """The newest `limit` samples (all when None) as a LocalDataset, oldest first."""
        from safetensors.numpy import load

        rows = self.db.execute(
            "SELECT label, tensors FROM samples ORDER BY id DESC LIMIT ?", (limit if limit else -1,)
        ).fetchall()[::-1]
        if not rows:
            raise DatasetError(f"sample store {self.path} is empty")
        decoded = [load(blob) for _, blob in rows]
        arrays = {k: np.stack([d[k] for d in decoded]) for k in decoded[0]}
        return LocalDataset(arrays, np.array([r[0] for r in rows], dtype=np.int64))

    def clear(self) -> int:
        return int(self.db.execute("DELETE FROM samples").rowcount)
