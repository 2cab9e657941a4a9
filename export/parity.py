"""Numeric parity of an exported model (run in its real runtime) against the PyTorch model (torch-free).

Both sides are plain `predict(dict[str, ndarray]) -> dict[str, ndarray]` callables, run on the same real
inputs (the workload's evaluation split). Per output: max and mean absolute error; for classifier
outputs ([batch, classes] logits) top-1 agreement; for embeddings cosine similarity (min and mean).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from export.errors import ParityError
from export.evaluate import run_batched

Predict = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
KINDS = ("classifier", "embedding", "tensor")


INT8_MIN_AGREEMENT, INT8_MIN_COSINE = 0.97, 0.95  # int8 parity against fp32, whichever format makes it


@dataclass(frozen=True)
class ParityBounds:
    """Limits a candidate must meet; None disables a check.

    max_abs: max |candidate - reference| over all elements; min_agreement: fraction of rows with the same
    argmax (classifier outputs); min_cosine: the lowest per-row cosine similarity (embedding outputs).
    """

    max_abs: float | None = 1e-4
    min_agreement: float | None = 1.0
    min_cosine: float | None = 0.9999

    @classmethod
    def for_dtype(cls, dtype: str) -> ParityBounds:
        """Defaults: fp32 max_abs < 1e-4, agreement 1.0, cosine >= 0.9999; fp16 agreement >= 0.995, cosine >= 0.999;
        int8 and the compressed Core ML forms agreement >= 0.97, lowest cosine >= 0.95 (compress.quantize's
        defaults too: one int8 bound for every format)."""
        if dtype == "fp32":
            return cls()
        if dtype == "fp16":
            return cls(max_abs=None, min_agreement=0.995, min_cosine=0.999)
        return cls(max_abs=None, min_agreement=INT8_MIN_AGREEMENT, min_cosine=INT8_MIN_COSINE)

    def with_overrides(self, **changes: float | None) -> ParityBounds:
        return replace(self, **changes)


@dataclass
class OutputParity:
    name: str
    kind: str
    max_abs: float
    mean_abs: float
    agreement: float | None = None
    min_cosine: float | None = None
    mean_cosine: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class ParityReport:
    samples: int
    bounds: ParityBounds
    outputs: list[OutputParity]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "passed": self.passed,
            "bounds": asdict(self.bounds),
            "outputs": [
                {k: v for k, v in asdict(o).items() if v is not None and k != "failures"}
                for o in self.outputs
            ],
        }

    def raise_for_failure(self, what: str = "exported model") -> None:
        failures = [f for o in self.outputs for f in o.failures]
        if failures:
            raise ParityError(
                f"{what}: parity out of bounds on {self.samples} samples: " + "; ".join(failures)
            )


class Recorded:
    """Wrap a predict function and remember its output rows by input-row content, so evaluating the
    same inputs again (the workload metric after the parity run) costs no second inference."""

    def __init__(self, predict: Predict) -> None:
        self.predict = predict
        self.rows: dict[bytes, dict[str, np.ndarray]] = {}

    @staticmethod
    def _keys(inputs: Mapping[str, np.ndarray]) -> list[bytes]:
        names = sorted(inputs)
        n = len(inputs[names[0]]) if names else 0
        return [b"".join(np.ascontiguousarray(inputs[k][i]).tobytes() for k in names) for i in range(n)]

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = self._keys(inputs)
        if keys and all(k in self.rows for k in keys):
            names = self.rows[keys[0]].keys()
            return {name: np.stack([self.rows[k][name] for k in keys]) for name in names}
        out = self.predict(inputs)
        for i, key in enumerate(keys):
            self.rows[key] = {name: np.asarray(v)[i] for name, v in out.items()}
        return out


def output_kind(name: str, shape: tuple[int, ...], metric: str | None = None) -> str:
    """classifier for [batch, classes] logits/probabilities, embedding for [batch, dim] vectors."""
    if len(shape) != 2:
        return "tensor"
    lowered = name.lower()
    if any(k in lowered for k in ("logit", "prob", "score", "class")) or metric in (
        "accuracy",
        "top1",
        "top-1",
    ):
        return "classifier"
    return "embedding"


def compare_outputs(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    bounds: ParityBounds,
    kinds: Mapping[str, str] | None = None,
    metric: str | None = None,
) -> ParityReport:
    """Compare two sets of outputs and check them against `bounds`."""
    results = []
    samples = 0
    for name, ref in reference.items():
        if name not in candidate:
            raise ParityError(f"the exported model has no output {name!r} (it has {sorted(candidate)})")
        ref64, cand64 = np.asarray(ref, np.float64), np.asarray(candidate[name], np.float64)
        if ref64.shape != cand64.shape:
            raise ParityError(
                f"output {name!r}: exported shape {list(cand64.shape)} != PyTorch shape {list(ref64.shape)}"
            )
        samples = max(samples, ref64.shape[0] if ref64.ndim else 1)
        kind = (kinds or {}).get(name) or output_kind(name, ref64.shape, metric)
        diff = np.abs(cand64 - ref64)
        result = OutputParity(
            name, kind, float(diff.max(initial=0.0)), float(diff.mean()) if diff.size else 0.0
        )
        if not np.all(np.isfinite(cand64)):
            result.failures.append(f"output {name!r} has non-finite values")
        if bounds.max_abs is not None and not result.max_abs < bounds.max_abs:
            result.failures.append(
                f"output {name!r} max abs error {result.max_abs:.3g} >= {bounds.max_abs:g}"
            )
        if kind == "classifier":
            result.agreement = float(np.mean(ref64.argmax(axis=1) == cand64.argmax(axis=1)))
            if bounds.min_agreement is not None and result.agreement < bounds.min_agreement:
                result.failures.append(
                    f"output {name!r} top-1 agreement {result.agreement:.4f} < {bounds.min_agreement:g}"
                )
        elif kind == "embedding":
            cos = _cosine(ref64, cand64)
            result.min_cosine, result.mean_cosine = float(cos.min()), float(cos.mean())
            if bounds.min_cosine is not None and result.min_cosine < bounds.min_cosine:
                result.failures.append(
                    f"output {name!r} cosine similarity min {result.min_cosine:.6f} (mean {result.mean_cosine:.6f}) < {bounds.min_cosine:g}"
                )
        results.append(result)
    return ParityReport(samples=samples, bounds=bounds, outputs=results)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)


def check_parity(
    reference: Predict,
    candidate: Predict,
    inputs: Mapping[str, np.ndarray],
    bounds: ParityBounds | None = None,
    kinds: Mapping[str, str] | None = None,
    metric: str | None = None,
    batch_size: int = 64,
    what: str = "exported model",
    raise_on_failure: bool = True,
) -> ParityReport:
    """Run both predict functions on `inputs` and compare; raises ParityError naming output and numbers."""
    bounds = bounds or ParityBounds()
    ref = run_batched(reference, dict(inputs), batch_size)
    cand = run_batched(candidate, dict(inputs), batch_size)
    report = compare_outputs(ref, cand, bounds, kinds, metric)
    if raise_on_failure:
        report.raise_for_failure(what)
    return report
