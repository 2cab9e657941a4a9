"""Update codecs: top-k sparsification and int8 stochastic-rounding quantization, composable, with
error feedback kept on the device between rounds (torch-free; runs on the device and the aggregator).

Wire format (one safetensors payload per update, docs/federated.md):
- metadata "pf": JSON header {"schema": "pf.fl.update/1", "task", "round", "device", "num_samples",
  "codec": {"topk": f, "int8": b}, "tensors": {name: {"shape": [...], "enc": "dense"|"topk",
  "q": "f32"|"int8"}}, "metrics": {...}}
- per tensor NAME: "NAME:v" values (float32, or int8 when q == "int8"), "NAME:i" flat indices
  (strictly increasing; uint16 for tensors of <= 65536 entries, else int32) when enc == "topk",
  "NAME:s" float32 [1] scale when q == "int8".
`decode_update` checks all of it (names, shapes, dtypes, sizes, index ranges, finiteness) before use.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import tensors as T
from .errors import FLError, MalformedUpdateError

UPDATE_SCHEMA = "pf.fl.update/1"
INT8_MAX = 127


@dataclass(frozen=True)
class CodecConfig:
    """topk: fraction of each tensor's entries sent (0 or 1 = dense); int8: quantize the sent values;
    error_feedback: keep what was not sent (and the rounding error) and add it to the next update;
    min_sparse: tensors with fewer elements go dense (biases, BatchNorm statistics: a partial update of
    those breaks the model, and they are a tiny share of the bytes)."""

    topk: float = 0.0
    int8: bool = False
    error_feedback: bool = True
    min_sparse: int = 1024

    def __post_init__(self) -> None:
        if not 0.0 <= self.topk <= 1.0:
            raise FLError(f"codec: topk={self.topk} must be a fraction in [0, 1]")

    @property
    def lossy(self) -> bool:
        return self.int8 or 0.0 < self.topk < 1.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> CodecConfig:
        data = dict(data or {})
        unknown = set(data) - {"topk", "int8", "error_feedback", "min_sparse"}
        if unknown:
            raise FLError(f"codec: unknown field(s) {sorted(unknown)}")
        return cls(float(data.get("topk", 0.0)), bool(data.get("int8", False)), bool(data.get("error_feedback", True)),
                   int(data.get("min_sparse", 1024)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = 64 << 20
    max_header_bytes: int = 1 << 20


@dataclass
class DecodedUpdate:
    header: dict[str, Any]
    delta: T.Weights
    num_samples: int
    nbytes: int
    metrics: dict[str, float] = field(default_factory=dict)


def index_dtype(size: int) -> str:
    """Flat indices of a tensor with `size` entries: uint16 when they fit, else int32."""
    return "uint16" if size <= 1 << 16 else "int32"


def stochastic_round(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Round to an integer neighbour with probability given by the distance (unbiased: E[r] = x)."""
    floor = np.floor(x)
    return floor + (rng.random(x.shape, dtype=np.float32) < (x - floor))


def quantize_int8(values: np.ndarray, rng: np.random.Generator, scale: float | None = None) -> tuple[np.ndarray, float]:
    """Symmetric int8 with stochastic rounding; scale = max|v| / 127 unless given (values clipped)."""
    values = np.asarray(values, np.float32)
    if scale is None:
        peak = float(np.abs(values).max()) if values.size else 0.0
        scale = peak / INT8_MAX if peak > 0 else 1.0
    q = np.clip(stochastic_round(values / np.float32(scale), rng), -INT8_MAX, INT8_MAX)
    return q.astype(np.int8), float(scale)


class ErrorFeedback:
    """Per-tensor residuals carried between rounds on the device, persisted as safetensors."""

    def __init__(self, residuals: T.Weights | None = None) -> None:
        self.residuals: T.Weights = residuals or {}

    def apply(self, name: str, value: np.ndarray) -> np.ndarray:
        r = self.residuals.get(name)
        return value + r if r is not None and r.shape == value.shape else value

    def save(self, path: str | Path) -> None:
        """Atomic write (temp file, fsync, rename)."""
        from safetensors.numpy import save

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = save({k: np.ascontiguousarray(v, np.float32) for k, v in self.residuals.items()}) if self.residuals else b""
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> ErrorFeedback:
        """The saved residuals; an absent, empty or unreadable file gives empty state (start fresh)."""
        from safetensors.numpy import load

        path = Path(path)
        try:
            data = path.read_bytes()
            return cls({k: v.astype(np.float32) for k, v in load(data).items()} if data else {})
        except (OSError, Exception):  # corrupt state must not stop training: start from zero residuals
            return cls()


def encode_update(
    delta: Mapping[str, np.ndarray],
    config: CodecConfig,
    header: Mapping[str, Any],
    state: ErrorFeedback | None = None,
    seed: int | None = None,
) -> bytes:
    """Encode a model update (new - global) into a payload; updates `state` residuals in place.

    `header` supplies task, round, device, num_samples, metrics (JSON-able).
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    meta: dict[str, dict[str, Any]] = {}
    use_ef = state is not None and config.error_feedback and config.lossy
    for name in sorted(delta):
        v = np.asarray(delta[name], np.float32)
        if use_ef:
            v = state.apply(name, v)
        flat = v.ravel()
        sparse = 0.0 < config.topk < 1.0 and flat.size >= config.min_sparse
        if sparse:
            k = max(1, int(round(config.topk * flat.size)))
            idx = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]).astype(index_dtype(flat.size))
            vals = flat[idx]
            out[f"{name}:i"] = idx
        else:
            vals = flat
        if config.int8:
            q, scale = quantize_int8(vals, rng)
            out[f"{name}:v"] = q
            out[f"{name}:s"] = np.array([scale], np.float32)
            sent = q.astype(np.float32) * np.float32(scale)
        else:
            out[f"{name}:v"] = vals.astype(np.float32)
            sent = vals
        meta[name] = {"shape": list(v.shape), "enc": "topk" if sparse else "dense", "q": "int8" if config.int8 else "f32"}
        if use_ef:
            dense = np.zeros_like(flat)
            if sparse:
                dense[idx] = sent
            else:
                dense = sent
            state.residuals[name] = (flat - dense).reshape(v.shape)
    hdr = {
        "schema": UPDATE_SCHEMA,
        "codec": {"topk": config.topk, "int8": config.int8},
        "tensors": meta,
        **{k: v for k, v in header.items() if k not in ("schema", "codec", "tensors")},
    }
    return T.to_bytes(out, hdr)


def _fail(msg: str) -> MalformedUpdateError:
    return MalformedUpdateError(f"update: {msg}")


def _check_header(header: dict[str, Any], expected: Mapping[str, tuple[int, ...]]) -> dict[str, dict[str, Any]]:
    if header.get("schema") != UPDATE_SCHEMA:
        raise _fail(f"schema {header.get('schema')!r} is not {UPDATE_SCHEMA!r}")
    ns = header.get("num_samples")
    if isinstance(ns, bool) or not isinstance(ns, int) or ns < 1:
        raise _fail(f"num_samples {ns!r} must be an integer >= 1")
    meta = header.get("tensors")
    if not isinstance(meta, dict):
        raise _fail("header has no 'tensors' object")
    if set(meta) != set(expected):
        missing, extra = sorted(set(expected) - set(meta)), sorted(set(meta) - set(expected))
        raise _fail(f"tensor names differ from the model's: missing {missing[:5]}, unknown {extra[:5]}")
    for name, m in meta.items():
        if not isinstance(m, dict):
            raise _fail(f"tensor {name!r} entry must be an object")
        if m.get("shape") != list(expected[name]):
            raise _fail(f"tensor {name!r} has shape {m.get('shape')}, the model's is {list(expected[name])}")
        if m.get("enc") not in ("dense", "topk") or m.get("q") not in ("f32", "int8"):
            raise _fail(f"tensor {name!r} has an unknown encoding {m.get('enc')!r}/{m.get('q')!r}")
    return meta


def _tensor(tensors: Mapping[str, np.ndarray], key: str, dtype: str, length: int | None = None) -> np.ndarray:
    arr = tensors.get(key)
    if arr is None:
        raise _fail(f"tensor {key!r} is missing")
    if arr.dtype != np.dtype(dtype):
        raise _fail(f"tensor {key!r} has dtype {arr.dtype}, expected {dtype}")
    if arr.ndim != 1 or (length is not None and arr.shape[0] != length):
        raise _fail(f"tensor {key!r} has shape {arr.shape}, expected ({length if length is not None else 'n'},)")
    return arr


def decode_update(
    payload: bytes, expected: Mapping[str, tuple[int, ...]], limits: DecodeLimits = DecodeLimits()
) -> DecodedUpdate:
    """Validate and decode a payload into a dense float32 update matching `expected` shapes.

    Raises OversizeUpdateError / MalformedUpdateError naming the problem; nothing is used before it passes.
    """
    header, tensors = T.from_bytes(payload, limits.max_bytes, limits.max_header_bytes)
    meta = _check_header(header, expected)
    used: set[str] = set()
    delta: T.Weights = {}
    for name, m in meta.items():
        shape = tuple(expected[name])
        size = int(np.prod(shape)) if shape else 1
        if m["enc"] == "topk":
            idx = _tensor(tensors, f"{name}:i", index_dtype(size)).astype(np.int64)
            if not 1 <= idx.shape[0] <= size:
                raise _fail(f"tensor {name!r} sends {idx.shape[0]} entries of {size}")
            if idx[0] < 0 or idx[-1] >= size or (idx.shape[0] > 1 and not (np.diff(idx) > 0).all()):
                raise _fail(f"tensor {name!r} indices are out of [0, {size}) or not strictly increasing")
            n = idx.shape[0]
            used.add(f"{name}:i")
        else:
            idx, n = None, size
        vals = _tensor(tensors, f"{name}:v", "int8" if m["q"] == "int8" else "float32", n)
        used.add(f"{name}:v")
        if m["q"] == "int8":
            scale = _tensor(tensors, f"{name}:s", "float32", 1)
            used.add(f"{name}:s")
            if not np.isfinite(scale).all() or scale[0] < 0:
                raise _fail(f"tensor {name!r} scale {scale[0]} must be finite and >= 0")
            vals = vals.astype(np.float32) * scale[0]
        if not np.isfinite(vals).all():
            raise _fail(f"tensor {name!r} holds NaN or infinity")
        if idx is not None:
            dense = np.zeros(size, np.float32)
            dense[idx] = vals
        else:
            dense = vals.astype(np.float32)
        delta[name] = dense.reshape(shape)
    extra = sorted(set(tensors) - used)
    if extra:
        raise _fail(f"payload holds unexpected tensors {extra[:5]}")
    metrics = header.get("metrics") if isinstance(header.get("metrics"), dict) else {}
    metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return DecodedUpdate(header, delta, int(header["num_samples"]), len(payload), metrics)
