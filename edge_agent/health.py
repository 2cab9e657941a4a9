"""Load a verified version and prove it works: run the package's sample inputs and compare with the
expected outputs within the manifest's tolerance (export.check_samples). The result is a ServedModel,
ready to serve (the samples run doubles as the warm-up).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import HealthCheckError
from edge_agent.head_runtime import with_head
from export.manifest import Manifest
from export.runtimes import Runtime, load_runtime
from export.samples import Samples, check_samples
from pocketfleet import PocketfleetError


@dataclass(eq=False)
class ServedModel:
    """One served version. Requests keep a reference to the object they started with (hot swap)."""

    name: str
    version: int
    manifest: Manifest
    runtime: Runtime
    path: Path
    health: dict[str, float] = field(default_factory=dict)
    load_s: float = 0.0
    loaded_at: float = field(default_factory=time.time)

    @property
    def ref(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version}

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "name": self.name,
            "version": self.version,
            "format": m.format,
            "dtype": m.dtype,
            "created": m.created,
            "expires": m.expires,
            "inputs": [s.to_dict() for s in m.inputs],
            "outputs": [s.to_dict() for s in m.outputs],
            "health_max_abs_error": self.health,
            "load_s": round(self.load_s, 4),
            "path": str(self.path),
        }


def health_check(directory: str | Path, manifest: Manifest, threads: int = 1) -> ServedModel:
    """Load the model of a verified version directory and check it on its samples; HealthCheckError else."""
    directory = Path(directory)
    where = f"{manifest.name} v{manifest.version}"
    start = time.perf_counter()
    try:
        runtime = load_runtime(directory / manifest.model, manifest.format, threads)
    except PocketfleetError as exc:
        raise HealthCheckError(f"{where}: the model does not load: {exc}") from exc
    runtime = with_head(runtime, manifest, directory)
    want_in = sorted(s.name for s in manifest.inputs)
    got_in = sorted(s.name for s in runtime.inputs)
    if want_in != got_in:
        raise HealthCheckError(f"{where}: the manifest lists inputs {want_in} but the model has {got_in}")
    if not manifest.samples:
        raise HealthCheckError(f"{where}: the package has no samples, so the agent cannot health-check it")
    try:
        samples = Samples.from_bytes((directory / manifest.samples["path"]).read_bytes(), manifest.samples)
        got: dict[str, Any] = {}
        errors = check_samples(lambda x: got.update(runtime.run(x)) or got, samples, where=where)
        _check_finite(got, samples, where)
    except PocketfleetError as exc:
        raise HealthCheckError(f"{where}: health check failed: {exc}") from exc
    except Exception as exc:  # a runtime failure on the samples is a failed health check, not a crash
        raise HealthCheckError(f"{where}: health check failed: {type(exc).__name__}: {exc}") from exc
    return ServedModel(
        manifest.name, manifest.version, manifest, runtime, directory, errors, time.perf_counter() - start
    )


def _check_finite(got: dict[str, Any], samples: Samples, where: str) -> None:
    """check_samples' tolerance test lets NaN through (NaN > bound is False): reject it here."""
    for name, want in samples.outputs.items():
        if np.isfinite(want).all() and not np.isfinite(np.asarray(got[name], dtype=np.float64)).all():
            raise HealthCheckError(f"{where}: health check failed: output {name!r} holds NaN or infinity")
