"""Sample inputs and expected outputs shipped in a package, for an on-device smoke test (torch-free).

`samples.safetensors` holds `input.<name>` and `output.<name>` arrays; the outputs were produced by the
exported model in its own runtime, so a device can check a freshly installed model with `check_samples`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pocketfleet import PocketfleetError

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3


class SampleMismatchError(PocketfleetError):
    """A model's outputs on the packaged samples differ from the expected outputs."""


@dataclass
class Samples:
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        first = next(iter(self.inputs.values()), None)
        return int(first.shape[0]) if first is not None and first.ndim else 0

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        tensors = {f"input.{k}": np.ascontiguousarray(v) for k, v in self.inputs.items()}
        tensors.update({f"output.{k}": np.ascontiguousarray(v) for k, v in self.outputs.items()})
        return save(tensors, metadata={"format": "pocketfleet-samples"})

    def manifest_entry(self, path: str) -> dict[str, Any]:
        return {"path": path, "count": self.count, "atol": self.atol, "rtol": self.rtol}

    @classmethod
    def from_bytes(cls, data: bytes, entry: Mapping[str, Any] | None = None) -> Samples:
        from safetensors.numpy import load

        tensors = load(data)
        entry = entry or {}
        return cls(
            inputs={k[6:]: v for k, v in tensors.items() if k.startswith("input.")},
            outputs={k[7:]: v for k, v in tensors.items() if k.startswith("output.")},
            atol=float(entry.get("atol", DEFAULT_ATOL)),
            rtol=float(entry.get("rtol", DEFAULT_RTOL)),
        )


def check_samples(
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], samples: Samples, where: str = "samples"
) -> dict[str, float]:
    """Run `run` on the sample inputs; raise SampleMismatchError if any output leaves atol + rtol*|expected|.

    Returns the max abs error per output.
    """
    got = run(dict(samples.inputs))
    errors = {}
    for name, want in samples.outputs.items():
        if name not in got:
            raise SampleMismatchError(f"{where}: the model produced no output {name!r}")
        value = np.asarray(got[name])
        if value.shape != want.shape:
            raise SampleMismatchError(
                f"{where}: output {name!r} has shape {list(value.shape)}, expected {list(want.shape)}"
            )
        diff = np.abs(value.astype(np.float64) - want.astype(np.float64))
        errors[name] = float(diff.max()) if diff.size else 0.0
        bound = samples.atol + samples.rtol * np.abs(want.astype(np.float64))
        if np.any(diff > bound):
            raise SampleMismatchError(
                f"{where}: output {name!r} differs from the expected sample output by up to {errors[name]:.3g} "
                f"(allowed atol {samples.atol:g} + rtol {samples.rtol:g})"
            )
    return errors
