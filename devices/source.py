"""Resolve what a user points at (a .pfpkg package or a bare .onnx/.tflite file) to a model file on disk."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from devices.graph import GRAPH_FORMATS, ModelReadError


@dataclass
class ModelSource:
    model_path: Path  # a readable model file (inside a temporary directory for packages)
    format: str
    storage_bytes: int  # what the device stores: the package, or the bare model file
    package: dict[str, Any] | None = None  # name, version, dtype, model member of a package
    samples: dict[str, np.ndarray] = field(default_factory=dict)  # packaged sample inputs, if any


@contextmanager
def open_model(path: str | Path) -> Iterator[ModelSource]:
    """Yield a ModelSource; a package's model member is extracted to a temporary file for the duration.

    The package is read without signature verification: estimating costs trusts nothing in it.
    """
    path = Path(path)
    if not path.exists():
        raise ModelReadError(f"model or package not found: {path}")
    fmt = GRAPH_FORMATS.get(path.suffix.lower())
    if fmt is not None:
        yield ModelSource(path, fmt, path.stat().st_size)
        return
    from export.package import open_package
    from export.samples import Samples

    with open_package(path) as reader, tempfile.TemporaryDirectory(prefix="pf-estimate-") as tmp:
        manifest = reader.manifest
        entry = manifest.files[manifest.model]
        model_path = Path(tmp) / Path(manifest.model).name
        with open(model_path, "wb") as fh:
            for chunk in reader.stream(manifest.model, entry.size):
                fh.write(chunk)
        samples: dict[str, np.ndarray] = {}
        if manifest.samples and manifest.samples.get("path") in reader.infos:
            sample_path = manifest.samples["path"]
            data = reader.read(sample_path, manifest.files[sample_path].size)
            samples = Samples.from_bytes(data, manifest.samples).inputs
        yield ModelSource(
            model_path=model_path,
            format=manifest.format,
            storage_bytes=path.stat().st_size,
            package={
                "name": manifest.name,
                "version": manifest.version,
                "dtype": manifest.dtype,
                "model": manifest.model,
            },
            samples=samples,
        )
