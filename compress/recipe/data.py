"""The rows a recipe run trains and calibrates on: workload splits (seeded subsets) or .npz files."""

from __future__ import annotations

from typing import Any

import numpy as np

from .schema import DataSource, DataSpec

Inputs = dict[str, np.ndarray]


class RecipeData:
    """Calibration inputs and fine-tuning (inputs, labels), read once and cached."""

    def __init__(self, spec: DataSpec, workload: Any) -> None:
        self.spec, self.workload = spec, workload
        self._cache: dict[str, tuple[Inputs, np.ndarray | None]] = {}

    def calibration(self) -> Inputs:
        """{input name: array} for quantization calibration."""
        return self._load("calibration", self.spec.calibration)[0]

    def finetune(self) -> tuple[Inputs, np.ndarray | None]:
        """(inputs by name, labels or None) for fine-tuning and distillation."""
        return self._load("finetune", self.spec.finetune)

    def batches(self, batch_size: int = 64, limit: int = 16) -> list[tuple[tuple[Any, ...], Any]]:
        """Up to `limit` shuffled (seeded) (input tensors in model order, label tensor or None) batches of
        the fine-tuning data: for BatchNorm recalibration and Taylor importance."""
        import torch

        inputs, labels = self.finetune()
        n = _rows(inputs)
        order = np.random.default_rng(self.spec.seed).permutation(n)[: batch_size * limit]
        names = [s.name for s in self.workload.inputs]
        out = []
        for start in range(0, len(order), batch_size):
            idx = np.sort(order[start : start + batch_size])
            xs = tuple(torch.from_numpy(np.ascontiguousarray(inputs[k][idx])) for k in names)
            ys = torch.from_numpy(labels[idx]) if labels is not None else None
            out.append((xs, ys))
        return out

    def _load(self, role: str, source: DataSource) -> tuple[Inputs, np.ndarray | None]:
        if role not in self._cache:
            if source.file is not None or source.folder is not None:
                from .user_recipe import load_source

                inputs, labels = load_source(source, list(self.workload.inputs))
                if role == "calibration":
                    labels = None
            else:
                inputs, labels = self.workload.data(source.split)
            if source.samples and source.samples < _rows(inputs):
                rng = np.random.default_rng(self.spec.seed)
                idx = np.sort(rng.permutation(_rows(inputs))[: source.samples])
                inputs = {k: v[idx] for k, v in inputs.items()}
                labels = labels[idx] if labels is not None else None
            self._cache[role] = (inputs, labels)
        return self._cache[role]

    def describe(self) -> dict[str, Any]:
        """Rows actually used, per role (for the report)."""
        out = {}
        for role, source in (("calibration", self.spec.calibration), ("finetune", self.spec.finetune)):
            rows = _rows(self._cache[role][0]) if role in self._cache else None
            out[role] = {"split": None if source.file else source.split, "file": source.file, "rows": rows}
        return out


def _rows(inputs: Inputs) -> int:
    return len(next(iter(inputs.values())))
