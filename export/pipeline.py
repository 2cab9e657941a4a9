"""A PyTorch model -> exported file -> parity in the real runtime -> signed package.

    result = export_model(my_module, format="onnx", dtype="fp16", out="model.pfpkg",
                          example_inputs=torch.randn(8, 3, 32, 32), version=3, key="keys/pocketfleet.key")

`model` is any `nn.Module` with its `example_inputs` (export.source.UserModel infers names, shapes and
dtypes), or an `ExportableModel` such as a reference workload (`compress.zoo.load_model_dir(path)`).
`package_artifact` is the lower-level entry for callers that produced the .onnx/.tflite file themselves
(quantization, pruning): it checks parity against the PyTorch model in the file's own runtime, scores the
model's metric, records samples and writes the package — or raises ParityError and writes nothing.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ExportError
from export.manifest import Manifest
from export.parity import ParityBounds, ParityReport, Predict, Recorded, check_parity
from export.samples import Samples
from export.source import ExportableModel, as_source

FORMATS = ("onnx", "tflite", "pte", "coreml")
DTYPES = ("fp32", "fp16")
FORMAT_DTYPES = {"onnx": DTYPES, "tflite": DTYPES, "pte": ("fp32", "int8"), "coreml": ("fp32", "fp16", "int8", "pal4")}
SUFFIX = {"onnx": ".onnx", "tflite": ".tflite", "pte": ".pte", "coreml": ".mlpackage.zip"}
CALIB_ROWS = 128  # calibration rows for the formats whose int8 is made at export (pte)
ONNX_EXAMPLE_BATCH = 2  # > 1 so that the exporter keeps the batch dimension symbolic
TFLITE_BATCH = 1


@dataclass
class ExportResult:
    package: Path | None
    model_file: Path | None
    manifest: Manifest | None
    parity: ParityReport
    metric: dict[str, Any]
    reference_metric: dict[str, Any] | None
    size_bytes: int
    export_seconds: float
    key_id: str | None
    extra: dict[str, Any] = field(default_factory=dict)
    fixed_batch: int | None = None  # the batch an ONNX export had to be fixed at (export.onnx), else None

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "package": str(self.package) if self.package else None,
            "model_file": str(self.model_file) if self.model_file else None,
            "name": m.name if m else None,
            "version": m.version if m else None,
            "format": m.format if m else self.extra.get("format"),
            "dtype": m.dtype if m else self.extra.get("dtype"),
            "size_bytes": self.size_bytes,
            "package_bytes": self.package.stat().st_size if self.package and self.package.exists() else None,
            "export_seconds": round(self.export_seconds, 2),
            "metric": self.metric,
            "reference_metric": self.reference_metric,
            "parity": self.parity.to_dict(),
            "key_id": self.key_id,
            "fixed_batch": self.fixed_batch,
            "inputs": [s.to_dict() for s in m.inputs] if m else None,
            "outputs": [s.to_dict() for s in m.outputs] if m else None,
        }


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ExportError(f"{what} must be one of {list(allowed)}, got {value!r}")
    return value


def convert(model: Any, format: str, dtype: str, path: str | Path, example_inputs: Any = None,
            allow_fixed_batch: bool = False, **source: Any) -> Path:
    """Write `model` (an ExportableModel, or an nn.Module with `example_inputs`) as an ONNX or TFLite file
    traced on its real inputs. `allow_fixed_batch`: an ONNX export that cannot keep its batch dynamic may,
    as the last resort, be made at a fixed batch (export.onnx; recorded in the file)."""
    import torch

    src = as_source(model, example_inputs, **source)
    _check_choice(format, FORMATS, "format")
    _check_choice(dtype, FORMAT_DTYPES[format], "dtype")
    batch = ONNX_EXAMPLE_BATCH if format == "onnx" else TFLITE_BATCH  # pte, coreml: fixed batch 1 too
    sample = src.sample_inputs(batch)
    example = {s.name: torch.from_numpy(np.ascontiguousarray(sample[s.name])) for s in src.input_specs}
    if format == "onnx":
        from export.onnx import export_onnx

        return export_onnx(src.module, src.input_specs, src.output_specs, tuple(example.values()), path, dtype=dtype,
                           allow_fixed_batch=allow_fixed_batch)  # fmt: skip
    if format == "pte":
        from export.pte import calibration_rows, export_pte

        calib = calibration_rows(src, CALIB_ROWS) if dtype == "int8" else None
        names = [s.name for s in src.input_specs]
        outs = [s.name for s in src.output_specs]
        return export_pte(src.module, names, outs, tuple(example.values()), path, dtype, calib)
    if format == "coreml":
        from export.coreml_package import convert_coreml

        return convert_coreml(src.module, src.input_specs, src.output_specs, tuple(example.values()), path, dtype)
    from export.tflite import export_tflite

    return export_tflite(src.module, [s.name for s in src.output_specs], example, path, dtype=dtype)


def package_artifact(
    model_file: str | Path,
    loaded_model: Any,
    format: str,
    dtype: str,
    out: str | Path,
    name: str | None = None,
    version: int = 1,
    key: Any = None,
    bounds: ParityBounds | None = None,
    extra_report: dict[str, Any] | None = None,
    device: str | None = None,
    extra: dict[str, Any] | None = None,
    trainable_head: dict[str, Any] | None = None,
    reference: Predict | None = None,
    valid_days: int | None = None,
    samples: int = 4,
    threads: int = 1,
    extra_files: dict[str, Path] | None = None,
) -> ExportResult:
    """Verify an already-made model file against its source model and package it.

    Parity: `reference` (default: the PyTorch module of `loaded_model`, an ExportableModel) vs the file run
    by export.runtimes on the model's evaluation inputs, within `bounds` (default per dtype);
    raises ParityError (no package written) otherwise. `dtype` is recorded as given (fp32, fp16, int8...).
    `extra_files` ({member: path}) go into the package beside the model (e.g. head weights).
    """
    from export.package import build_package
    from export.runtimes import load_runtime
    from export.signing import key_id, load_private_key

    lm = as_source(loaded_model)
    model_file = Path(model_file)
    _check_choice(format, FORMATS, "format")
    private = load_private_key(key) if key is not None else None  # fail on a bad key before the slow part
    if format == "coreml":  # no Core ML runtime off macOS: checked as far as the host can (export.coreml)
        from export.coreml_package import package_coreml

        return package_coreml(model_file, lm, dtype, out, private, name=name, version=version, device=device,
                              extra_report=extra_report, extra=extra, valid_days=valid_days, samples=samples)  # fmt: skip
    runtime = load_runtime(model_file, format=format, threads=threads)
    parity, metric, reference_metric = _parity_and_metrics(
        lm, runtime.run, reference, bounds, dtype, model_file, format
    )
    sample_inputs = lm.sample_inputs(samples)
    sample_outputs = runtime.run(sample_inputs)
    size = model_file.stat().st_size
    report = {
        "metric": metric,
        "reference_metric": reference_metric,
        "size_bytes": size,
        "parity": parity.to_dict(),
        **(extra_report or {}),
    }
    fields = {
        "name": name or lm.name,
        "version": version,
        "format": format,
        "dtype": dtype,
        "device": device,
        "workload": lm.workload_name,
        "inputs": runtime.inputs,
        "outputs": runtime.outputs,
        "preprocessing": lm.preprocessing,
        "report": report,
        "trainable_head": trainable_head,
        "extra": extra or {},
    }
    manifest = build_package(
        {f"model{SUFFIX[format]}": model_file, **(extra_files or {})},
        fields,
        Samples(dict(sample_inputs), sample_outputs),
        out,
        key=private,
        valid_days=valid_days,
    )
    return ExportResult(
        package=Path(out),
        model_file=model_file,
        manifest=manifest,
        parity=parity,
        metric=metric,
        reference_metric=reference_metric,
        size_bytes=size,
        export_seconds=0.0,
        key_id=key_id(private.public_key()) if private else None,
    )


def export_model(
    model: Any,
    format: str,
    dtype: str = "fp32",
    out: str | Path | None = None,
    name: str | None = None,
    version: int = 1,
    key: Any = None,
    device: str | None = None,
    bounds: ParityBounds | None = None,
    valid_days: int | None = None,
    model_out: str | Path | None = None,
    extra: dict[str, Any] | None = None,
    progress: bool = False,
    reference: Predict | None = None,
    trainable_head: bool = False,
    example_inputs: Any = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_axes: dict[str, Any] | None = None,
    parity_inputs: Any = None,
) -> ExportResult:
    """Convert, check parity in the real runtime, and write the package `out` (signed when `key`).

    `model`: an `nn.Module` with `example_inputs` (a tensor/array or a tuple of them, batch first; the batch
    dimension is dynamic unless `dynamic_axes` says otherwise; names default to input / output), or an
    ExportableModel (e.g. `compress.zoo.load_model_dir(path)`). Parity is checked against the module on the
    example inputs plus `parity_inputs`, in the exported file's own runtime.

    `trainable_head` (ONNX classifiers ending in nn.Linear): the file also outputs `features` (the final
    layer's input) and the package carries that layer as a trainable head (export.head).

    An ONNX model that exports with a dynamic batch by no exporter is exported at a fixed batch as the last
    resort (export.onnx): a UserWarning, `ExportResult.fixed_batch` and the package's `report.fixed_batch`.

    `model_out` also keeps the bare model file. With `out=None` only parity and the metric are computed.
    `progress` shows the stages as a tqdm bar on stderr. `reference` replaces the PyTorch predict (pass
    one `export.Recorded(lm.predict)` to several exports of the same model to run PyTorch only once).
    """
    _check_choice(format, FORMATS, "format")
    _check_choice(dtype, FORMAT_DTYPES[format], "dtype")
    if trainable_head and format != "onnx":
        raise ExportError(f"a trainable head is supported for ONNX exports only, not {format}")
    from tqdm.auto import tqdm

    bar = tqdm(total=3, desc="load model", unit="stage", disable=not progress, file=sys.stderr, leave=False)
    lm = as_source(model, example_inputs, input_names=input_names, output_names=output_names,
                   dynamic_axes=dynamic_axes, parity_inputs=parity_inputs) if example_inputs is not None else as_source(model)
    bar.update()
    work = Path(tempfile.mkdtemp(prefix="pf-export-"))
    try:
        bar.set_description(f"convert to {format}/{dtype}")
        started = time.perf_counter()
        path = convert(lm, format, dtype, work / f"model{SUFFIX[format]}", allow_fixed_batch=True)
        how = _how_exported(path, format)
        head: dict[str, Any] = {}
        if trainable_head:
            head = _split_head(path, lm.output_specs[0].name, work)
        seconds = time.perf_counter() - started
        bar.update()
        bar.set_description("parity + metric in the runtime" + (", package" if out is not None else ""))
        if out is None:
            result = _parity_only(path, lm, format, dtype, bounds, reference)
        else:
            result = package_artifact(
                path, lm, format, dtype, out, name=name, version=version, key=key, bounds=bounds,
                extra_report={"export_seconds": round(seconds, 2), **how}, device=device, extra=extra,
                valid_days=valid_days, reference=reference, **head,
            )  # fmt: skip
        result.export_seconds = seconds
        result.fixed_batch = how.get("fixed_batch")
        result.extra.update(how)
        if model_out is not None:
            Path(model_out).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, model_out)
            result.model_file = Path(model_out)
        else:
            result.model_file = None
        bar.update()
        return result
    finally:
        bar.close()
        shutil.rmtree(work, ignore_errors=True)


def _how_exported(path: Path, format: str) -> dict[str, Any]:
    """{"onnx_exporter": ..., "fixed_batch": n} when the ONNX export had to fall back (export.onnx), else {}."""
    if format != "onnx":
        return {}
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    how: dict[str, Any] = {}
    if meta.get("pocketfleet.exporter", "dynamo") != "dynamo":
        how["onnx_exporter"] = meta["pocketfleet.exporter"]
    if meta.get("pocketfleet.fixed_batch"):
        how["fixed_batch"] = int(meta["pocketfleet.fixed_batch"])
    return how


def _split_head(path: Path, output: str, work: Path) -> dict[str, Any]:
    """package_artifact arguments for a trainable head over `output` (the file gains `features`)."""
    from safetensors.numpy import save_file

    from export.head import HEAD_FILE
    from export.head_split import head_manifest, split_head

    weights = split_head(path, output)
    save_file(weights, str(work / HEAD_FILE))
    return {"trainable_head": head_manifest(weights, output), "extra_files": {HEAD_FILE: work / HEAD_FILE}}


def _parity_and_metrics(
    lm: ExportableModel,
    candidate: Predict,
    reference: Predict | None,
    bounds: ParityBounds | None,
    dtype: str,
    model_file: Path,
    format: str,
) -> tuple[ParityReport, dict[str, Any], dict[str, Any]]:
    """Parity on the evaluation inputs, then the model's metric of both sides from the recorded outputs."""
    ref, cand = Recorded(reference or lm.predict), Recorded(candidate)
    parity = check_parity(
        ref, cand, lm.eval_inputs(), bounds or ParityBounds.for_dtype(dtype),
        metric=lm.metric_name, what=f"{model_file.name} ({format}/{dtype})",
    )  # fmt: skip
    return parity, _clean(lm.evaluate(predict=cand)), _clean(lm.evaluate(predict=ref))


def _parity_only(
    path: Path,
    lm: ExportableModel,
    format: str,
    dtype: str,
    bounds: ParityBounds | None,
    reference: Predict | None,
) -> ExportResult:
    from export.runtimes import load_runtime

    if format == "coreml":
        from export.coreml_package import coreml_check_only

        return coreml_check_only(path, dtype)
    runtime = load_runtime(path, format=format)
    parity, metric, reference_metric = _parity_and_metrics(
        lm, runtime.run, reference, bounds, dtype, path, format
    )
    return ExportResult(
        package=None, model_file=path, manifest=None, parity=parity, metric=metric,
        reference_metric=reference_metric, size_bytes=path.stat().st_size, export_seconds=0.0, key_id=None,
        extra={"format": format, "dtype": dtype},
    )  # fmt: skip


def _clean(metric: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy of a metric dict (numpy scalars -> Python)."""
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in metric.items()}
