"""The trainable head a package may declare (manifest `trainable_head`, schema in docs/federated.md):
dense layers in PyTorch layout (weight [out, in], bias [out]), ReLU or nothing between them, over the
model's `features` output. Torch- and onnx-free: the exporter writes it, the agent serves and trains it,
the FL release rewrites its weights.

    {"schema": "pf.trainable_head/1", "features": "features", "weights": "head.safetensors",
     "layers": [{"weight": "classifier.weight", "bias": "classifier.bias", "activation": "none"}],
     "output": "logits"}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from export.errors import HeadError

FEATURES = "features"
HEAD_FILE = "head.safetensors"
HEAD_SCHEMA = "pf.trainable_head/1"
ACTIVATIONS = ("none", "relu")

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class DenseLayer:
    weight: str
    bias: str | None = None
    activation: str = "none"


class Head:
    """The architecture of a dense head (the weights travel separately, as a name -> array dict)."""

    def __init__(self, layers: list[DenseLayer], features: str = "features", weights_file: str | None = None,
                 output: str | None = None):
        if not layers:
            raise HeadError("trainable_head: 'layers' is empty")
        for i, layer in enumerate(layers):
            if layer.activation not in ACTIVATIONS:
                raise HeadError(
                    f"trainable_head: layers[{i}].activation {layer.activation!r} must be one of {ACTIVATIONS}"
                )
        self.layers = layers
        self.features = features
        self.weights_file = weights_file
        self.output = output

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any]) -> Head:
        """Parse a manifest `trainable_head` entry (raises HeadError naming the bad field)."""
        if not isinstance(entry, Mapping):
            raise HeadError("trainable_head must be an object")
        if entry.get("schema") != HEAD_SCHEMA:
            raise HeadError(f"trainable_head.schema {entry.get('schema')!r} is not {HEAD_SCHEMA!r}")
        raw = entry.get("layers")
        if not isinstance(raw, list):
            raise HeadError("trainable_head.layers must be a list")
        layers = []
        for i, item in enumerate(raw):
            if not isinstance(item, Mapping) or not isinstance(item.get("weight"), str):
                raise HeadError(f"trainable_head.layers[{i}] needs a 'weight' tensor name")
            layers.append(DenseLayer(item["weight"], item.get("bias"), str(item.get("activation", "none"))))
        features, output = entry.get("features", "features"), entry.get("output")
        if not isinstance(features, str) or not (output is None or isinstance(output, str)):
            raise HeadError("trainable_head.features and .output must be output names")
        if output == features:
            raise HeadError(f"trainable_head.output {output!r} cannot be the features output")
        return cls(layers, features, entry.get("weights"), output)

    def to_manifest(self) -> dict[str, Any]:
        entry = {
            "schema": HEAD_SCHEMA,
            "features": self.features,
            "weights": self.weights_file,
            "layers": [
                {"weight": la.weight, "bias": la.bias, "activation": la.activation} for la in self.layers
            ],
        }
        return entry if self.output is None else {**entry, "output": self.output}

    @property
    def names(self) -> list[str]:
        return [n for la in self.layers for n in (la.weight, la.bias) if n]

    def check(self, weights: Mapping[str, np.ndarray], in_dim: int | None = None) -> None:
        """Raise HeadError unless `weights` hold every layer's tensors with chaining shapes."""
        prev = in_dim
        for i, la in enumerate(self.layers):
            w = weights.get(la.weight)
            if w is None or w.ndim != 2:
                raise HeadError(f"head layer {i}: weight {la.weight!r} is missing or not 2-D")
            if prev is not None and w.shape[1] != prev:
                raise HeadError(
                    f"head layer {i}: weight {la.weight!r} takes {w.shape[1]} inputs, previous gives {prev}"
                )
            if la.bias is not None:
                b = weights.get(la.bias)
                if b is None or b.shape != (w.shape[0],):
                    raise HeadError(f"head layer {i}: bias {la.bias!r} must have shape ({w.shape[0]},)")
            prev = w.shape[0]

    def init(self, dims: list[int], seed: int = 0) -> Weights:
        """Fresh weights for feature dim dims[0] -> ... -> dims[-1] classes (PyTorch's Linear init)."""
        if len(dims) != len(self.layers) + 1:
            raise HeadError(f"head init: {len(self.layers)} layers need {len(self.layers) + 1} dims")
        rng = np.random.default_rng(seed)
        out: Weights = {}
        for la, fan_in, fan_out in zip(self.layers, dims[:-1], dims[1:], strict=True):
            bound = 1.0 / np.sqrt(fan_in)
            out[la.weight] = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32)
            if la.bias:
                out[la.bias] = rng.uniform(-bound, bound, fan_out).astype(np.float32)
        return out

    def _forward(self, weights: Mapping[str, np.ndarray], x: np.ndarray) -> list[np.ndarray]:
        acts = [x]
        for la in self.layers:
            z = acts[-1] @ weights[la.weight].T
            if la.bias:
                z = z + weights[la.bias]
            if la.activation == "relu":
                z = np.maximum(z, 0.0)
            acts.append(z)
        return acts

    def logits(self, weights: Mapping[str, np.ndarray], features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
        return self._forward(weights, x)[-1]

    def predict(self, weights: Mapping[str, np.ndarray], features: np.ndarray) -> np.ndarray:
        return self.logits(weights, features).argmax(axis=1)

    def loss_and_grads(
        self, weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray
    ) -> tuple[float, Weights]:
        """Mean softmax cross-entropy over the batch and its gradient for every head tensor."""
        acts = self._forward(weights, x)
        logits = acts[-1]
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        n = len(y)
        loss = float(-log_probs[np.arange(n), y].mean())
        grad = np.exp(log_probs)
        grad[np.arange(n), y] -= 1.0
        grad /= n
        grads: Weights = {}
        for i in range(len(self.layers) - 1, -1, -1):
            la = self.layers[i]
            if la.activation == "relu":
                grad = grad * (acts[i + 1] > 0)
            grads[la.weight] = grad.T @ acts[i]
            if la.bias:
                grads[la.bias] = grad.sum(axis=0)
            if i:
                grad = grad @ weights[la.weight]
        return loss, grads
