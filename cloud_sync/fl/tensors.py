"""Weights as name -> float32 NumPy dicts: arithmetic, flattening, safetensors bytes with a JSON header."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import MalformedUpdateError, OversizeUpdateError

Weights = dict[str, np.ndarray]
HEADER_KEY = "pf"


def copy(w: Mapping[str, np.ndarray]) -> Weights:
    return {k: np.array(v, dtype=np.float32, copy=True) for k, v in w.items()}


def zeros_like(w: Mapping[str, np.ndarray]) -> Weights:
    return {k: np.zeros_like(v, dtype=np.float32) for k, v in w.items()}


def sub(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> Weights:
    return {k: (np.asarray(a[k], np.float32) - np.asarray(b[k], np.float32)) for k in b}


def add(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], scale: float = 1.0) -> Weights:
    return {k: (np.asarray(a[k], np.float32) + np.float32(scale) * np.asarray(b[k], np.float32)) for k in a}


def flatten(w: Mapping[str, np.ndarray], names: list[str] | None = None) -> np.ndarray:
    names = names if names is not None else sorted(w)
    if not names:
        return np.zeros(0, np.float32)
    return np.concatenate([np.asarray(w[k], np.float32).ravel() for k in names])


def unflatten(vec: np.ndarray, like: Mapping[str, np.ndarray], names: list[str] | None = None) -> Weights:
    names = names if names is not None else sorted(like)
    out, pos = {}, 0
    for k in names:
        n = int(np.prod(like[k].shape))
        out[k] = np.asarray(vec[pos : pos + n], np.float32).reshape(like[k].shape)
        pos += n
    return out


def l2_norm(w: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.square(np.asarray(v, np.float64)).sum()) for v in w.values())))


def shapes(w: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(d) for d in v.shape) for k, v in w.items()}


def to_bytes(tensors: Mapping[str, np.ndarray], header: Mapping[str, Any] | None = None) -> bytes:
    """safetensors bytes; `header` (JSON) goes in the metadata under key 'pf'."""
    from safetensors.numpy import save

    meta = {HEADER_KEY: json.dumps(header, sort_keys=True, separators=(",", ":"))} if header is not None else None
    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=meta)


def from_bytes(
    payload: bytes, max_bytes: int, max_header_bytes: int = 1 << 20
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse safetensors bytes with size checks first; returns (JSON header, tensors).

    Raises OversizeUpdateError / MalformedUpdateError (never a dependency's exception).
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise MalformedUpdateError(f"payload must be bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) > max_bytes:
        raise OversizeUpdateError(f"payload is {len(payload)} bytes, more than the limit of {max_bytes}")
    if len(payload) < 8:
        raise MalformedUpdateError(f"payload is {len(payload)} bytes, too short for safetensors")
    (hlen,) = struct.unpack("<Q", payload[:8])
    if hlen > max_header_bytes:
        raise OversizeUpdateError(f"payload header declares {hlen} bytes, more than the limit of {max_header_bytes}")
    if 8 + hlen > len(payload):
        raise MalformedUpdateError(f"payload header declares {hlen} bytes but the payload has {len(payload) - 8}")
    try:
        raw_header = json.loads(payload[8 : 8 + hlen].decode("utf-8"))
        from safetensors.numpy import load

        tensors = load(payload)
    except Exception as exc:  # any parse failure of untrusted bytes is "malformed"
        raise MalformedUpdateError(f"payload is not valid safetensors ({type(exc).__name__}: {exc})") from exc
    meta = raw_header.get("__metadata__") or {}
    header: dict[str, Any] = {}
    if HEADER_KEY in meta:
        try:
            header = json.loads(meta[HEADER_KEY])
        except (TypeError, ValueError, RecursionError) as exc:  # ValueError: also a 5000-digit integer
            raise MalformedUpdateError(f"payload header '{HEADER_KEY}' is not JSON ({exc})") from exc
        if not isinstance(header, dict):
            raise MalformedUpdateError(f"payload header '{HEADER_KEY}' must be a JSON object")
    return header, tensors


def peek_header(payload: bytes, max_header_bytes: int = 1 << 20) -> dict[str, Any]:
    """Only the JSON 'pf' header of a safetensors payload (tensors are not read)."""
    if not isinstance(payload, (bytes, bytearray, memoryview)) or len(payload) < 8:
        raise MalformedUpdateError("payload is not bytes or too short for safetensors")
    (hlen,) = struct.unpack("<Q", bytes(payload[:8]))
    if hlen > max_header_bytes:
        raise OversizeUpdateError(f"payload header declares {hlen} bytes, more than the limit of {max_header_bytes}")
    if 8 + hlen > len(payload):
        raise MalformedUpdateError(f"payload header declares {hlen} bytes but the payload has {len(payload) - 8}")
    try:
        raw = json.loads(bytes(payload[8 : 8 + hlen]).decode("utf-8"))
        header = json.loads((raw.get("__metadata__") or {}).get(HEADER_KEY, "{}"))
    except (UnicodeDecodeError, ValueError, AttributeError, TypeError, RecursionError) as exc:
        raise MalformedUpdateError(f"payload header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise MalformedUpdateError("payload header must be a JSON object")
    return header


def weights_to_bytes(weights: Mapping[str, np.ndarray], header: Mapping[str, Any] | None = None) -> bytes:
    return to_bytes({k: np.asarray(v, np.float32) for k, v in weights.items()}, header)


def weights_from_bytes(
    payload: bytes, expected: Mapping[str, tuple[int, ...]] | None = None, max_bytes: int = 1 << 30
) -> tuple[dict[str, Any], Weights]:
    """Global weights (float32, finite) from bytes, checked against `expected` shapes when given."""
    header, tensors = from_bytes(payload, max_bytes)
    if expected is not None and set(tensors) != set(expected):
        raise MalformedUpdateError(
            f"weights hold {sorted(tensors)[:5]}..., expected {sorted(expected)[:5]}... ({len(tensors)} vs {len(expected)})"
        )
    for k, v in tensors.items():
        if v.dtype != np.float32:
            raise MalformedUpdateError(f"weights tensor {k!r} has dtype {v.dtype}, expected float32")
        if expected is not None and tuple(v.shape) != tuple(expected[k]):
            raise MalformedUpdateError(f"weights tensor {k!r} has shape {v.shape}, expected {tuple(expected[k])}")
        if not np.isfinite(v).all():
            raise MalformedUpdateError(f"weights tensor {k!r} holds NaN or infinity")
    return header, dict(tensors)
