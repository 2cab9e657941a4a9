"""Runtime-agnostic evaluation: batch any `predict(inputs) -> outputs` callable over numpy arrays and
score the result (numpy only, so the same code scores PyTorch, onnxruntime and LiteRT)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Predict = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def num_rows(inputs: dict[str, np.ndarray]) -> int:
    sizes = {name: len(arr) for name, arr in inputs.items()}
    if len(set(sizes.values())) != 1:
        from pocketfleet import PocketfleetError

        raise PocketfleetError(f"inputs disagree on the batch size: {sizes}")
    return next(iter(sizes.values()))


def run_batched(
    predict: Predict,
    inputs: dict[str, np.ndarray],
    batch_size: int = 32,
    pad_last: bool = True,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Call `predict` on consecutive batches and concatenate its outputs along axis 0.

    With pad_last the final short batch is padded (repeating its last row) to exactly `batch_size` rows and
    the padding is dropped from the outputs, so runtimes with a fixed batch dimension work too.
    `progress` shows a tqdm bar on stderr.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = num_rows(inputs)
    parts: dict[str, list[np.ndarray]] = {}
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="predict", unit="batch", leave=False)
    for start in starts:
        batch = {k: v[start : start + batch_size] for k, v in inputs.items()}
        rows = len(next(iter(batch.values())))
        if pad_last and rows < batch_size:
            batch = {
                k: np.concatenate([v, np.repeat(v[-1:], batch_size - rows, axis=0)]) for k, v in batch.items()
            }
        for name, out in predict(batch).items():
            parts.setdefault(name, []).append(np.asarray(out)[:rows])
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def pick_output(outputs: dict[str, np.ndarray], name: str) -> np.ndarray:
    """The output called `name`, or the only output whatever a runtime named it."""
    if name in outputs:
        return outputs[name]
    if len(outputs) == 1:
        return next(iter(outputs.values()))
    from pocketfleet import PocketfleetError

    raise PocketfleetError(f"predict returned outputs {sorted(outputs)}, none named {name!r}")


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    pred = np.asarray(logits).reshape(len(labels), -1).argmax(axis=1)
    correct = int((pred == labels).sum())
    return {"metric": "top1", "value": correct / len(labels), "correct": correct, "n": int(len(labels))}


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _neighbours(unit: np.ndarray, k: int) -> np.ndarray:
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)  # a sentence is not its own neighbour
    return np.argpartition(-sims, k - 1, axis=1)[:, :k]


def embedding_fidelity(embeddings: np.ndarray, reference: np.ndarray, k: int = 10) -> dict[str, Any]:
    """Cosine similarity to reference embeddings (mean and min) and top-k neighbour agreement: for each
    sentence, |top-k neighbours by the model ∩ top-k by the reference| / k, averaged."""
    emb = np.asarray(embeddings).reshape(len(reference), -1)
    if emb.shape != reference.shape:
        from pocketfleet import PocketfleetError

        raise PocketfleetError(f"embeddings have shape {emb.shape}, the reference {reference.shape}")
    a, b = _unit(emb), _unit(reference)
    cos = (a * b).sum(axis=1)
    kk = min(k, len(reference) - 1)  # fewer candidates than k: compare all of them
    mine, ref = _neighbours(a, kk), _neighbours(b, kk)
    overlap = [len(np.intersect1d(m, r, assume_unique=True)) / kk for m, r in zip(mine, ref, strict=True)]
    return {
        "metric": "cosine",
        "value": float(cos.mean()),
        "cosine": float(cos.mean()),
        "cosine_min": float(cos.min()),
        f"top{k}_agreement": float(np.mean(overlap)),
        "n": int(len(reference)),
    }
