"""Core ML exports in the export pipeline: convert to a zipped `.mlpackage`, check it as far as this host
can, and write the signed package (export.pipeline calls these for format "coreml").

What is checked on a host without Core ML (Linux): the program loads in coremltools as an ML program spec,
its input and output names are the workload's, the compressed variants contain their decompression ops,
and the weight bytes reach the expected compression against the fp32 program (`export.coreml`). Numeric
parity and the workload metric of the Core ML model are recorded as "not run on this host" with the reason;
the package's samples hold the PyTorch fp32 outputs with a tolerance per dtype (the device's health check
compares the Core ML outputs against them).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.coreml import NOT_RUN, can_predict, export_coreml, inspect_mlpackage, zip_mlpackage
from export.errors import ExportError
from export.parity import ParityBounds, ParityReport
from export.samples import Samples
from export.specs import TensorSpec

if TYPE_CHECKING:
    import torch

    from export.pipeline import ExportResult

MEMBER = "model.mlpackage.zip"
# health-check tolerance of the Core ML outputs against the PyTorch fp32 samples: atol = factor x max|output|
SAMPLE_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "int8": 0.1, "pal4": 0.25}
REASON = "coremltools predicts only on macOS; the Core ML program was not run, so its outputs are not known here"


class ParityNotRun(ParityReport):
    """Parity that was not measured: `passed` is False (nothing proven), `to_dict` says why."""

    def __init__(self, reason: str = REASON) -> None:
        super().__init__(samples=0, bounds=ParityBounds(), outputs=[])
        self.reason = reason

    @property
    def passed(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        return {"status": NOT_RUN, "passed": None, "reason": self.reason}


def convert_coreml(
    module: torch.nn.Module,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    example: Sequence[torch.Tensor],
    path: str | Path,
    dtype: str,
) -> Path:
    """Convert to an .mlpackage and zip it into the single file `path` (export.coreml.zip_mlpackage)."""
    with tempfile.TemporaryDirectory(prefix="pf-coreml-") as tmp:
        package = export_coreml(module, inputs, outputs, example, Path(tmp) / "model.mlpackage", dtype)
        return zip_mlpackage(package, path)


def verify_coreml(path: Path, dtype: str, input_names: Sequence[str], output_names: Sequence[str]) -> dict[str, Any]:
    """inspect_mlpackage plus the checks this pipeline requires; ExportError naming the failed check."""
    info = inspect_mlpackage(path, dtype)
    got_in, got_out = [f["name"] for f in info["inputs"]], [f["name"] for f in info["outputs"]]
    if got_in != list(input_names) or got_out != list(output_names):
        raise ExportError(
            f"{path.name}: Core ML program has inputs {got_in} / outputs {got_out}, expected {list(input_names)} / {list(output_names)}"
        )
    failed = [k for k, ok in info.get("checks", {}).items() if not ok]
    if failed:
        raise ExportError(
            f"{path.name} ({dtype}): check {failed[0]!r} failed: ops {info['ops']}, weight bytes {info['weight_bytes']} "
            f"vs fp32 {info.get('fp32_weight_bytes')}"
        )
    return info


def coreml_check_only(path: Path, dtype: str) -> ExportResult:
    """export_model(..., out=None) for Core ML: the host checks, no parity."""
    from export.pipeline import ExportResult

    info = inspect_mlpackage(path, dtype)
    return ExportResult(
        package=None, model_file=path, manifest=None, parity=ParityNotRun(), metric={}, reference_metric=None,
        size_bytes=path.stat().st_size, export_seconds=0.0, key_id=None,
        extra={"format": "coreml", "dtype": dtype, "coreml": info},
    )  # fmt: skip


def package_coreml(
    model_file: Path,
    lm: Any,
    dtype: str,
    out: str | Path,
    private: Any,
    name: str | None = None,
    version: int = 1,
    device: str | None = "iphone-15",
    extra_report: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    valid_days: int | None = None,
    samples: int = 4,
) -> ExportResult:
    """Check a zipped .mlpackage made from `lm` (an ExportableModel) and write its (signed) package."""
    from export.package import build_package
    from export.pipeline import ExportResult, _clean
    from export.signing import key_id

    info = verify_coreml(model_file, dtype, [s.name for s in lm.input_specs], [s.name for s in lm.output_specs])
    sample_inputs = lm.sample_inputs(samples)
    expected = {k: np.asarray(v, np.float32) for k, v in lm.predict(sample_inputs).items()}
    scale = max((float(np.abs(v).max()) for v in expected.values()), default=1.0)
    reference_metric = _clean(lm.evaluate())
    parity = ParityNotRun()
    report = {
        "metric": None,
        "metric_status": NOT_RUN if not can_predict() else "not measured by the export pipeline",
        "reference_metric": reference_metric,
        "size_bytes": model_file.stat().st_size,
        "parity": parity.to_dict(),
        "coreml": {k: info[k] for k in ("ops", "weight_bytes", "fp32_weight_bytes", "compression_ratio", "checks",
                                         "spec_version") if k in info},  # fmt: skip
        "samples_source": "PyTorch fp32 outputs (the Core ML program was not run here)",
        **(extra_report or {}),
    }
    fields = {
        "name": name or lm.name,
        "version": version,
        "format": "coreml",
        "dtype": dtype,
        "device": device or "iphone-15",
        "workload": lm.workload_name,
        "inputs": [TensorSpec(f["name"], tuple(f["shape"]), f["dtype"]) for f in info["inputs"]],
        "outputs": [TensorSpec(s.name, (1, *expected[s.name].shape[1:]), "float32") for s in lm.output_specs],
        "preprocessing": lm.preprocessing,
        "report": report,
        "extra": extra or {},
    }
    atol = SAMPLE_TOLERANCE[dtype] * max(scale, 1e-6)
    manifest = build_package(
        {MEMBER: model_file}, fields, Samples(dict(sample_inputs), expected, atol=atol, rtol=0.0), out,
        key=private, valid_days=valid_days,
    )  # fmt: skip
    return ExportResult(
        package=Path(out), model_file=model_file, manifest=manifest, parity=parity, metric={},
        reference_metric=reference_metric, size_bytes=model_file.stat().st_size, export_seconds=0.0,
        key_id=key_id(private.public_key()) if private else None, extra={"coreml": info},
    )  # fmt: skip
