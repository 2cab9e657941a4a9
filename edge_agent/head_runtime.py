"""Serving a package's trainable head (torch-free).

When a package declares `trainable_head.output`, the agent computes that output in NumPy from the
model's `features` output and the head weights shipped in the package, instead of taking the model's
own value: a head-only release (new weights, same model file) then changes what the device answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from export.runtimes import Runtime


class HeadRuntime(Runtime):
    """`inner` with output `head.output` recomputed from `head.features` by `head` with `weights`."""

    def __init__(self, inner: Runtime, head: Any, weights: dict[str, np.ndarray]) -> None:
        super().__init__(inner.path, inner.threads)
        self.inner, self.head, self.weights = inner, head, weights
        self.format, self._batch_free = inner.format, inner._batch_free
        self.inputs, self.outputs = inner.inputs, inner.outputs

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "head": {"output": self.head.output, "features": self.head.features}}

    def _invoke(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.inner._invoke(inputs)
        out[self.head.output] = self.head.logits(self.weights, out[self.head.features]).astype(np.float32)
        return out


def with_head(runtime: Runtime, manifest: Any, directory: Path) -> Runtime:
    """`runtime` wrapped in a HeadRuntime when the manifest's trainable head names an output it serves."""
    entry = manifest.trainable_head
    if not entry or not entry.get("output"):
        return runtime
    from safetensors.numpy import load_file

    from edge_agent.errors import HealthCheckError
    from export.errors import HeadError
    from export.head import Head

    try:
        head = Head.from_manifest(entry)
        specs = {s.name: s for s in runtime.outputs}
        if not {head.output, head.features} <= set(specs):
            raise HeadError(f"the model's outputs {sorted(specs)} lack {head.output!r} or {head.features!r}")
        if not head.weights_file:
            raise HeadError("trainable_head.weights names no file")
        weights = {k: v.astype(np.float32) for k, v in load_file(str(directory / head.weights_file)).items()}
        width = specs[head.features].shape[-1] if specs[head.features].shape else None
        head.check(weights, in_dim=width if isinstance(width, int) and width > 0 else None)
    except (HeadError, OSError, ValueError) as exc:
        raise HealthCheckError(f"{manifest.name} v{manifest.version}: bad trainable head: {exc}") from exc
    return HeadRuntime(runtime, head, weights)
