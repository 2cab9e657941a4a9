"""Metrics a user names for their own model (numpy only): "top1", "cosine", "mse", "module:function" or a
callable `(outputs, labels) -> float`; and `fidelity`, how closely a candidate follows its float model when
there are no labels.

    m = resolve_metric("top1")
    m.score(logits, labels)     # {"metric": "top1", "value": 0.98, "n": 360}
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from export.errors import ExportError

BUILTIN = ("top1", "cosine", "mse")


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[np.ndarray, np.ndarray], float]
    higher_is_better: bool = True

    def score(self, outputs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        value = float(self.fn(np.asarray(outputs), np.asarray(labels)))
        if not np.isfinite(value):
            raise ExportError(f"metric {self.name!r} returned {value}")
        return {"metric": self.name, "value": value, "n": int(len(outputs))}


def top1(outputs: np.ndarray, labels: np.ndarray) -> float:
    labels = labels.reshape(-1).astype(np.int64)
    return float((outputs.reshape(len(labels), -1).argmax(axis=1) == labels).mean())


def cosine(outputs: np.ndarray, targets: np.ndarray) -> float:
    """Mean per-row cosine similarity of outputs to target vectors (embeddings)."""
    a = outputs.reshape(len(outputs), -1).astype(np.float64)
    b = targets.reshape(len(targets), -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.where(den > 0, (a * b).sum(axis=1) / np.maximum(den, 1e-300), 1.0)))


def mse(outputs: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean((outputs.astype(np.float64) - targets.astype(np.float64)) ** 2))


def resolve_metric(metric: str | Callable[..., float] | Metric) -> Metric:
    """A Metric from a built-in name, "package.module:function" or a callable."""
    if isinstance(metric, Metric):
        return metric
    if callable(metric):
        return Metric(getattr(metric, "__name__", "metric"), metric)
    if metric == "top1":
        return Metric("top1", top1)
    if metric == "cosine":
        return Metric("cosine", cosine)
    if metric == "mse":
        return Metric("mse", mse, higher_is_better=False)
    if isinstance(metric, str) and ":" in metric:
        module, _, attr = metric.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ExportError(f"metric {metric!r} cannot be imported: {exc}") from None
        if not callable(fn):
            raise ExportError(f"metric {metric!r} is not callable")
        return Metric(attr, fn)
    raise ExportError(f"unknown metric {metric!r}; use one of {list(BUILTIN)}, 'module:function' or a callable")


def fidelity(candidate: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """How closely `candidate` follows `reference` (the float model): top-1 agreement for [batch, classes]
    outputs, mean cosine similarity otherwise; plus the max absolute error."""
    cand, ref = np.asarray(candidate, np.float64), np.asarray(reference, np.float64)
    if cand.shape != ref.shape:
        raise ExportError(f"candidate output has shape {list(cand.shape)}, the reference {list(ref.shape)}")
    out: dict[str, Any] = {"n": int(len(ref)), "max_abs_err": float(np.abs(cand - ref).max()) if ref.size else 0.0}
    if ref.ndim == 2 and ref.shape[1] > 1:
        out.update(metric="agreement", value=float((cand.argmax(1) == ref.argmax(1)).mean()))
    else:
        out.update(metric="cosine", value=cosine(cand, ref))
    out["cosine"] = cosine(cand, ref)
    return out
