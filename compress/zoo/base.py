"""The Workload abstraction: a dataset, a model family, a metric, and the tensors that cross the model's
boundary. One module per workload implements it (digits_cnn, digits_mbnet, minilm_l6)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.evaluate import Predict, num_rows
from export.specs import MetricSpec, TensorSpec

if TYPE_CHECKING:
    from torch import nn

SPLITS = ("train", "val", "test")


class Workload(ABC):
    """A reference workload. Data access and evaluation are numpy-only; `build` and `make` need torch."""

    name: str
    description: str
    arch: str  # the model class family, recorded in model.json
    metric: MetricSpec
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    preprocessing: str  # how raw data becomes the input tensors (a note for the package manifest)

    @abstractmethod
    def default_config(self) -> dict[str, Any]:
        """The JSON-able architecture config of the reference model."""

    @abstractmethod
    def build(self, config: dict[str, Any] | None = None, pretrained: bool = True) -> nn.Module:
        """A model of this architecture (`pretrained` loads published weights where the workload has them)."""

    @abstractmethod
    def data(self, split: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """(input arrays by input name, labels or None) for "train", "val" or "test"."""

    @abstractmethod
    def evaluate(self, predict: Predict, batch_size: int = 32, split: str = "test") -> dict[str, Any]:
        """Score `predict` on a split: {"metric": name, "value": float, ...}."""

    @abstractmethod
    def make(self, out_dir: str | Path, seed: int = 0, progress: bool = True) -> Path:
        """Create the reference model (train or load it) and save it as a model directory."""

    # --- shared behaviour -------------------------------------------------------------------------

    def eval_inputs(self) -> dict[str, np.ndarray]:
        """The whole test split."""
        return self.data("test")[0]

    def calib_inputs(self, n: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
        """`n` rows drawn (seeded, without replacement; all rows if fewer) from the train split."""
        inputs = self.data("train")[0]
        idx = np.sort(np.random.default_rng(seed).permutation(num_rows(inputs))[:n])
        return {k: v[idx] for k, v in inputs.items()}

    def sample_inputs(self, n: int = 4) -> dict[str, np.ndarray]:
        """The first `n` real test inputs (for smoke tests and tracing)."""
        return {k: v[:n] for k, v in self.eval_inputs().items()}

    def save_assets(self, module: nn.Module, out_dir: Path) -> dict[str, Any]:
        """Write workload-specific files next to the weights; return extra model.json fields."""
        return {}

    def bind(self, model_dir: Path, meta: dict[str, Any]) -> Workload:
        """The workload as seen by a saved model directory (may read files written by save_assets)."""
        return self

    def num_params(self, config: dict[str, Any] | None = None) -> int:
        return sum(p.numel() for p in self.build(config, pretrained=False).parameters())

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "metric": self.metric.name,
            "higher_is_better": self.metric.higher_is_better,
            "params": self.num_params(),
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
        }

    def __repr__(self) -> str:
        return f"<Workload {self.name}>"


def torch_predict(module: nn.Module, workload: Workload) -> Predict:
    """Wrap a PyTorch module as a numpy predict callable (no grad, inputs in the workload's order)."""
    import torch

    def predict(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(inputs[s.name])) for s in workload.inputs]
        with torch.no_grad():
            out = module(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {s.name: o.detach().cpu().numpy() for s, o in zip(workload.outputs, outs, strict=True)}

    return predict


def check_split(split: str) -> str:
    if split not in SPLITS:
        from pocketfleet import PocketfleetError

        raise PocketfleetError(f"unknown data split {split!r}; choose one of {', '.join(SPLITS)}")
    return split
