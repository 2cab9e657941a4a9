"""Update codecs: top-k sparsification and int8 stochastic-rounding quantization, composable, with
error feedback kept on the device between rounds (torch-free; runs on the device and the aggregator).

Wire format (one safetensors payload per update, docs/federated.md):
- metadata "pf": JSON header {"schema": "pf.fl.update/1", "task", "round", "attempt", "device",
  "num_samples", "codec": {"topk": f, "int8": b}, "tensors": {name: {"enc": "dense"} | {"enc": "topk",
  "k": n}}, "metrics": {...}}
- four flat arrays, each the concatenation over the tensors in sorted-name order (a few header entries
  whatever the model's tensor count): "values" (int8 when codec.int8, else float32; k entries for a
  top-k tensor, all entries for a dense one); the positions of each top-k tensor's entries as a bitmap
  ("bitmap", uint8, packbits, ceil(size/8) bytes) when that is smaller than an index list, else as
  strictly increasing flat indices in "idx16" (uint16, tensors of <= 65536 entries) or "idx32" (int32);
  "scales" (float32, one per tensor, int8 only). `index_kind(size, k)` decides, on both sides.
`decode_update` checks all of it (names, shapes, dtypes, sizes, index ranges, finiteness) before use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import tensors as T
from .errors import FLError, MalformedUpdateError

UPDATE_SCHEMA = "pf.fl.update/1"
INT8_MAX = 127
MAX_NUM_SAMPLES = 2**53  # exact as a float weight, and fits the round store's SQLite INTEGER


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


def index_kind(size: int, k: int) -> str:
    """How the positions of k of `size` entries travel: a bitmap (size/8 bytes) when that is smaller
    than the index list (k x 2 or 4 bytes), else uint16 / int32 indices. Both sides derive it."""
    dtype = index_dtype(size)
    return "bitmap" if (size + 7) // 8 < k * np.dtype(dtype).itemsize else dtype


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

        from pocketfleet.fs import atomic_write_bytes

        data = save({k: np.ascontiguousarray(v, np.float32) for k, v in self.residuals.items()}) if self.residuals else b""
        atomic_write_bytes(path, data)

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

    `header` supplies task, round, attempt, device, num_samples, metrics (JSON-able).
    """
    rng = np.random.default_rng(seed)
    values: list[np.ndarray] = []
    idx16: list[np.ndarray] = []
    idx32: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    scales: list[float] = []
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
            idx = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :])
            kind = index_kind(flat.size, k)
            if kind == "bitmap":
                bits = np.zeros(flat.size, np.uint8)
                bits[idx] = 1
                masks.append(np.packbits(bits))
            else:
                (idx16 if kind == "uint16" else idx32).append(idx.astype(kind))
            vals = flat[idx]
            meta[name] = {"enc": "topk", "k": k}
        else:
            vals = flat
            meta[name] = {"enc": "dense"}
        if config.int8:
            q, scale = quantize_int8(vals, rng)
            values.append(q)
            scales.append(scale)
            sent = q.astype(np.float32) * np.float32(scale)
        else:
            values.append(vals.astype(np.float32))
            sent = vals
        if use_ef:
            dense = np.zeros_like(flat)
            if sparse:
                dense[idx] = sent
            else:
                dense = sent
            state.residuals[name] = (flat - dense).reshape(v.shape)
    out = {"values": np.concatenate(values) if values else np.zeros(0, np.int8 if config.int8 else np.float32)}
    if idx16:
        out["idx16"] = np.concatenate(idx16)
    if idx32:
        out["idx32"] = np.concatenate(idx32)
    if masks:
        out["bitmap"] = np.concatenate(masks)
    if config.int8:
        out["scales"] = np.array(scales, np.float32)
    hdr = {
        "schema": UPDATE_SCHEMA,
        "codec": {"topk": config.topk, "int8": config.int8},
        "tensors": meta,
        **{k: v for k, v in header.items() if k not in ("schema", "codec", "tensors")},
    }
    return T.to_bytes(out, hdr)


def _fail(msg: str) -> MalformedUpdateError:
    return MalformedUpdateError(f"update: {msg}")


def _check_header(header: dict[str, Any], expected: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, Any], bool]:
    if header.get("schema") != UPDATE_SCHEMA:
        raise _fail(f"schema {header.get('schema')!r} is not {UPDATE_SCHEMA!r}")
    ns = header.get("num_samples")
    if isinstance(ns, bool) or not isinstance(ns, int) or not 1 <= ns <= MAX_NUM_SAMPLES:
        raise _fail(f"num_samples {ns!r:.40} must be an integer in [1, 2**53]")
    codec = header.get("codec")
    if not isinstance(codec, dict) or not isinstance(codec.get("int8"), bool):
        raise _fail("header 'codec' must be an object with a boolean 'int8'")
    meta = header.get("tensors")
    if not isinstance(meta, dict):
        raise _fail("header has no 'tensors' object")
    if set(meta) != set(expected):
        missing, extra = sorted(set(expected) - set(meta)), sorted(set(meta) - set(expected))
        raise _fail(f"tensor names differ from the model's: missing {missing[:5]}, unknown {extra[:5]}")
    for name, m in meta.items():
        if not isinstance(m, dict) or m.get("enc") not in ("dense", "topk"):
            raise _fail(f"tensor {name!r} has an unknown encoding {m.get('enc') if isinstance(m, dict) else m!r}")
        if m["enc"] == "topk":
            size = int(np.prod(expected[name])) if expected[name] else 1
            k = m.get("k")
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= size:
                raise _fail(f"tensor {name!r} sends k={k!r} entries of {size}")
    return meta, codec["int8"]


def _finite(v: Any) -> float | None:
    """A metric value as a finite float, or None (non-numbers, NaN/inf, integers beyond float range)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if np.isfinite(f) else None


def _array(tensors: Mapping[str, np.ndarray], key: str, dtype: str, length: int) -> np.ndarray:
    arr = tensors.get(key)
    if arr is None:
        if length == 0:
            return np.zeros(0, dtype)
        raise _fail(f"tensor {key!r} is missing")
    if arr.dtype != np.dtype(dtype):
        raise _fail(f"tensor {key!r} has dtype {arr.dtype}, expected {dtype}")
    if arr.ndim != 1 or arr.shape[0] != length:
        raise _fail(f"tensor {key!r} has shape {arr.shape}, the header needs ({length},)")
    return arr


def decode_update(
    payload: bytes, expected: Mapping[str, tuple[int, ...]], limits: DecodeLimits = DecodeLimits()
) -> DecodedUpdate:
    """Validate and decode a payload into a dense float32 update matching `expected` shapes.

    Raises OversizeUpdateError / MalformedUpdateError naming the problem; nothing is used before it passes.
    """
    header, tensors = T.from_bytes(payload, limits.max_bytes, limits.max_header_bytes)
    meta, int8 = _check_header(header, expected)
    extra = sorted(set(tensors) - {"values", "idx16", "idx32", "bitmap", "scales"})
    if extra:
        raise _fail(f"payload holds unexpected tensors {extra[:5]}")
    names = sorted(meta)
    sizes = {n: int(np.prod(expected[n])) if expected[n] else 1 for n in names}
    counts = {n: meta[n]["k"] if meta[n]["enc"] == "topk" else sizes[n] for n in names}
    kinds = {n: index_kind(sizes[n], counts[n]) for n in names if meta[n]["enc"] == "topk"}
    n16 = sum(counts[n] for n, k in kinds.items() if k == "uint16")
    n32 = sum(counts[n] for n, k in kinds.items() if k == "int32")
    nbits = sum((sizes[n] + 7) // 8 for n, k in kinds.items() if k == "bitmap")
    values = _array(tensors, "values", "int8" if int8 else "float32", sum(counts.values()))
    idx16 = _array(tensors, "idx16", "uint16", n16)
    idx32 = _array(tensors, "idx32", "int32", n32)
    bitmap = _array(tensors, "bitmap", "uint8", nbits)
    scales = _array(tensors, "scales", "float32", len(names)) if int8 else None
    if not int8 and "scales" in tensors:
        raise _fail("payload holds scales but the codec is not int8")
    if scales is not None and (not np.isfinite(scales).all() or (scales < 0).any()):
        raise _fail("scales must be finite and >= 0")
    pos = {"v": 0, "uint16": 0, "int32": 0, "bitmap": 0}
    delta: T.Weights = {}
    for i, name in enumerate(names):
        size, n = sizes[name], counts[name]
        vals = values[pos["v"] : pos["v"] + n].astype(np.float32)
        pos["v"] += n
        if scales is not None:
            vals = vals * scales[i]
        if not np.isfinite(vals).all():
            raise _fail(f"tensor {name!r} holds NaN or infinity")
        if meta[name]["enc"] == "topk":
            kind = kinds[name]
            if kind == "bitmap":
                nb = (size + 7) // 8
                bits = np.unpackbits(bitmap[pos["bitmap"] : pos["bitmap"] + nb])
                pos["bitmap"] += nb
                if bits[size:].any() or int(bits[:size].sum()) != n:
                    raise _fail(f"tensor {name!r} bitmap marks {int(bits.sum())} entries (padding included), k={n}")
                idx = np.flatnonzero(bits[:size])
            else:
                src = idx16 if kind == "uint16" else idx32
                idx = src[pos[kind] : pos[kind] + n].astype(np.int64)
                pos[kind] += n
            if idx[0] < 0 or idx[-1] >= size or (n > 1 and not (np.diff(idx) > 0).all()):
                raise _fail(f"tensor {name!r} indices are out of [0, {size}) or not strictly increasing")
            dense = np.zeros(size, np.float32)
            dense[idx] = vals
        else:
            dense = vals
        delta[name] = dense.reshape(tuple(expected[name]))
    metrics = header.get("metrics") if isinstance(header.get("metrics"), dict) else {}
    metrics = {k: f for k, v in metrics.items() if (f := _finite(v)) is not None}
    return DecodedUpdate(header, delta, int(header["num_samples"]), len(payload), metrics)
