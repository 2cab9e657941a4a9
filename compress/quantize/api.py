"""`quantize(model, QuantConfig(...), calib_data)`: a model in, deployable int8/fp16 artifacts with signed
packages out.

    from compress import quantize, QuantConfig
    result = quantize(my_module, QuantConfig(mode="static"), calib_loader, out_dir="out",
                      eval_data=(x_val, y_val), metric="top1", key="keys/pocketfleet.key")
    for a in result.artifacts:
        print(a.format, a.dtype, a.metric["value"], a.size_bytes, a.latency_ms, a.float_layers, a.package)

`model` is a plain `nn.Module`, a path to an existing fp32 `.onnx` file, or a reference workload
(a `compress.zoo` model directory or LoadedModel) — all become one `QuantModel` (compress.quantize.source)
and go the same way: BN folding and fp32 export (export.convert), optional QAT, the compress-only core
(compress.quantize.core.quantize_files: calibration, sensitivity, max_drop, fallback), latency, and one
package per artifact through `export.package_artifact` (parity against the float model in the file's own
runtime, the metric, signing with `key`), plus a device estimate with `device=`.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import QuantConfig
from .core import SUFFIX, QuantizedFile, quantize_files
from .data import CalibData
from .errors import QuantizeError
from .sensitivity import SensitivityTable
from .source import QuantModel, resolve


@dataclass
class QuantArtifact:
    """One deployable model: file, package and everything a compression report needs."""

    path: Path
    format: str
    dtype: str
    mode: str
    metric: dict[str, Any]
    size_bytes: int
    latency_ms: dict[str, Any] | None
    parity: dict[str, Any]
    float_layers: list[str]
    package: Path | None = None
    calibration: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["path"] = str(self.path)
        out["package"] = str(self.package) if self.package else None
        return out


@dataclass
class QuantResult:
    model: str
    metric: dict[str, Any]  # {"name", "higher_is_better"}
    baseline: dict[
        str, Any
    ]  # fp32: {"metric": {...}, "formats": {fmt: {"path", "size_bytes", "latency_ms"}}}
    artifacts: list[QuantArtifact]
    config: QuantConfig
    sensitivity: dict[str, SensitivityTable] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "metric": self.metric,
            "baseline": self.baseline,
            "artifacts": [a.to_dict() for a in self.artifacts],
            "config": self.config.to_dict(),
            "sensitivity": {k: v.to_dict() for k, v in self.sensitivity.items()},
            "details": self.details,
        }




def _config(config: QuantConfig | Mapping[str, Any] | None) -> QuantConfig:
    if config is None:
        return QuantConfig().validate()
    if isinstance(config, Mapping):
        return QuantConfig.from_dict(dict(config))
    return dataclasses.replace(config).validate()


def _bounds(cfg: QuantConfig, dtype: str) -> Any:
    from export.parity import ParityBounds

    if dtype == "int8":
        return ParityBounds(
            max_abs=None, min_agreement=cfg.parity_min_agreement, min_cosine=cfg.parity_min_cosine
        )
    return ParityBounds.for_dtype(dtype)


def fold_model(loaded: Any) -> tuple[Any, list[str]]:
    """A copy of the model (a LoadedModel / QuantModel dataclass) with BatchNorms folded into the preceding
    conv/linear layers."""
    from .fold import fold_batchnorm

    module, folded = fold_batchnorm(loaded.module)
    return dataclasses.replace(loaded, module=module), folded


def _formats(cfg: QuantConfig, qm: QuantModel) -> QuantConfig:
    """An ONNX input makes ONNX artifacts only (there is no ONNX -> TFLite converter here)."""
    if qm.onnx_file is None:
        return cfg
    if cfg.mode == "qat":
        raise QuantizeError(f"{qm.onnx_file.name}: mode 'qat' trains a PyTorch module; an ONNX input takes "
                            "static, dynamic or fp16")  # fmt: skip
    if cfg.formats not in (["onnx"], ["onnx", "tflite"], ["tflite", "onnx"]):
        raise QuantizeError(f"{qm.onnx_file.name}: an ONNX input makes formats ['onnx'] only, not {cfg.formats}")
    return dataclasses.replace(cfg, formats=["onnx"])


def _fp32_files(qm: QuantModel, cfg: QuantConfig, out: Path, stem: str,
                given: Mapping[str, str | Path] | None) -> dict[str, Path]:  # fmt: skip
    """The fp32 baseline file of every format: the ONNX input itself, a file the caller already exported
    from this model, or export.convert of the (BN-folded) module."""
    from export.pipeline import convert

    files: dict[str, Path] = {}
    for fmt in cfg.formats:
        path = out / f"{stem}.fp32{SUFFIX[fmt]}"
        if qm.onnx_file is not None:
            if qm.onnx_file.resolve() != path.resolve():
                shutil.copyfile(qm.onnx_file, path)
            files[fmt] = path
        elif given and fmt in given:
            files[fmt] = Path(given[fmt])
        else:
            files[fmt] = _convert(convert, qm, fmt, path)
    return files


def _convert(convert: Any, qm: QuantModel, fmt: str, path: Path) -> Path:
    from export.errors import ExportError

    try:
        return convert(qm, fmt, "fp32", path)
    except ExportError as exc:
        raise QuantizeError(str(exc)) from exc


def _estimate(path: Path, device: str) -> dict[str, Any]:
    from devices import analyze_model, estimate_cost, load_profile

    return estimate_cost(analyze_model(path), load_profile(device), path.stat().st_size).to_dict()


def quantize(
    model: Any,
    config: QuantConfig | Mapping[str, Any] | None = None,
    calib_data: CalibData | None = None,
    out_dir: str | Path | None = None,
    *,
    example_inputs: Any = None,
    eval_data: Any = None,
    metric: Any = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_axes: dict[str, Any] | None = None,
    key: Any = None,
    name: str | None = None,
    version: int = 1,
    device: str | None = None,
    latency_runs: int = 30,
    sensitivity: bool = False,
    fp32: Mapping[str, str | Path] | None = None,
    progress: bool = False,
) -> QuantResult:
    """Quantize `model` into deployable artifacts (one per format of the config), each with its package.

    model: an `nn.Module`, a path to an fp32 `.onnx` file, or a reference workload (model directory path
      or compress.zoo LoadedModel).
    calib_data: representative inputs: an array or tensor, a dict name -> array, a list of those, or any
      iterable / DataLoader of batches (tensors, dicts or (inputs, targets)); None for a workload draws
      `calib_samples` rows of its train split.
    example_inputs: what the module is traced with (default: the first calibration rows); input_names,
      output_names, dynamic_axes as in export.export_model.
    eval_data / metric: `(inputs, labels)` or an iterable of batches, scored with "top1", "cosine", "mse",
      "module:function" or a callable (outputs, labels) -> float (default: top1 for integer labels, else
      cosine). Without eval_data the artifacts are judged by fidelity to the float model's own outputs on
      the calibration rows (top-1 agreement for [batch, classes] outputs, else cosine), and a metric
      without labels compares with the float outputs. max_drop and the sensitivity table use this metric.
    key: sign the packages. device: a device profile to estimate each artifact on (recorded in the
      package and in `artifact.details["estimate"]`). `fp32`: {format: file} already exported from this
      model (skips the export; must be BN-folded). `latency_runs=0` skips latency.
    With `latency_runs` >= 20, an int8 file slower than its fp32 file (p50, interleaved) is not shipped:
      for static ONNX with per-channel weights a per-tensor rebuild is timed first; what is dropped has no
      artifact or package, and `details["dropped"]` gives both figures (compress.quantize.speed_guard).
    """
    from export.latency import measure_latency, single_input
    from export.pipeline import package_artifact

    cfg = _config(config)
    qm, calib = resolve(
        model, calib_data, example_inputs=example_inputs, eval_data=eval_data, metric=metric,
        input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
        calib_samples=cfg.calib_samples, split=cfg.sensitivity_split, samples=cfg.sensitivity_samples,
        eval_batch_size=cfg.eval_batch_size, threads=cfg.threads,
    )  # fmt: skip
    cfg = _formats(cfg, qm)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="pf-quant-"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="trials-", dir=out))
    stem = name or qm.name
    details: dict[str, Any] = {"folded_batchnorms": []}
    folded = qm
    if qm.module is not None:
        # the fp32 baseline files come from the folded model (same function; layer names of the conv, not the BN)
        folded, details["folded_batchnorms"] = fold_model(qm)
    fp32_files = _fp32_files(folded, cfg, out, stem, fp32)
    source = dict(fp32_files)
    if cfg.mode == "qat":
        from export.pipeline import convert

        from .qat import qat_finetune

        module, details["qat"] = qat_finetune(folded, cfg, calib, progress=progress)
        trained = folded.with_module(module)
        source = {fmt: _convert(convert, trained, fmt, work / f"qat{SUFFIX[fmt]}") for fmt in cfg.formats}
    baseline_score = None
    if cfg.max_drop is not None or sensitivity:
        baseline_score = qm.scorer.score_predict(qm.reference)
    built, tables = quantize_files(source, cfg, calib, out, work, stem, scorer=qm.scorer, baseline=baseline_score,
                                   sensitivity=sensitivity, progress=progress)  # fmt: skip

    # latency: every model of this run, interleaved, batch 1 of real data
    probe = single_input(qm.eval_inputs())
    names = {f"fp32.{fmt}": p for fmt, p in fp32_files.items()} | {f"{cfg.mode}.{b.format}": b.path for b in built}
    latency = measure_latency(names, probe, threads=cfg.threads, runs=latency_runs) if latency_runs else {}
    # never ship an int8 slower than fp32 on its target (speed_guard); this host's timing judges only a
    # host target: for a described device (device="raspberry-pi-4") the report keeps the host figures
    if built and built[0].dtype == "int8" and latency and device in (None, "host"):
        built = _drop_slower(built, cfg, latency, latency_runs, details, fp32_files, source, calib, out, work, stem, probe)
    elif built and built[0].dtype == "int8" and latency:
        details["int8_vs_fp32"] = {"verdict": f"kept: the target is {device}, not this host; host timings are "
                                              "in latency_ms, the device estimate in details['estimate']"}
    artifacts = [_package(b, qm, cfg, out, stem, version, key, device, latency, package_artifact) for b in built]
    baseline = {
        "metric": _clean(qm.evaluate(qm.reference)),
        "formats": {
            fmt: {"path": str(p), "size_bytes": p.stat().st_size, "latency_ms": latency.get(f"fp32.{fmt}")}
            for fmt, p in fp32_files.items()
        },
    }
    shutil.rmtree(work, ignore_errors=True)
    return QuantResult(
        model=qm.path or qm.name,
        metric={"name": qm.metric_name, "higher_is_better": qm.scorer.higher_is_better},
        baseline=baseline,
        artifacts=artifacts,
        config=cfg,
        sensitivity=tables,
        details=details,
    )


def _package(b: QuantizedFile, qm: QuantModel, cfg: QuantConfig, out: Path, stem: str, version: int, key: Any,
             device: str | None, latency: dict[str, Any], package_artifact: Any) -> QuantArtifact:  # fmt: skip
    """Parity, metric and the (signed) package of one quantized file, through export."""
    static = cfg.mode in ("static", "qat")
    lat = latency.get(f"{cfg.mode}.{b.format}")
    info = dict(b.info)
    report: dict[str, Any] = {"mode": cfg.mode, "calibration": cfg.calibration if static else None,
                              "float_layers": b.float_layers, "latency_ms": lat}  # fmt: skip
    if device is not None:
        info["estimate"] = report["estimate"] = _estimate(b.path, device)
    result = package_artifact(
        b.path, qm, b.format, b.dtype, out / f"{stem}.{cfg.mode}.{b.format}.pfpkg", name=stem, version=version,
        key=key, bounds=_bounds(cfg, b.dtype), extra_report=report, reference=qm.reference, threads=cfg.threads,
        device=device,
    )  # fmt: skip
    return QuantArtifact(
        path=b.path, format=b.format, dtype=b.dtype, mode=cfg.mode, metric=result.metric,
        size_bytes=b.path.stat().st_size, latency_ms=lat, parity=result.parity.to_dict(),
        float_layers=b.float_layers, package=result.package,
        calibration=cfg.calibration if static else None, details=info,
    )  # fmt: skip


def quantization_sensitivity(
    model: Any,
    config: QuantConfig | Mapping[str, Any] | None = None,
    calib_data: CalibData | None = None,
    format: str = "onnx",
    progress: bool = False,
    **source: Any,
) -> SensitivityTable:
    """The per-layer sensitivity table alone: the metric with only one layer quantized at a time.
    `source` takes quantize's model arguments (example_inputs, eval_data, metric, input_names, ...)."""
    from .core import _Target

    cfg = _config(config)
    if cfg.mode == "fp16":
        raise QuantizeError("sensitivity needs an int8 mode (static, dynamic or qat), not fp16")
    qm, calib = resolve(model, calib_data, calib_samples=cfg.calib_samples, split=cfg.sensitivity_split,
                        samples=cfg.sensitivity_samples, eval_batch_size=cfg.eval_batch_size, threads=cfg.threads,
                        **source)  # fmt: skip
    cfg = _formats(dataclasses.replace(cfg, formats=[format]), qm)
    with tempfile.TemporaryDirectory(prefix="pf-sens-") as tmp:
        work = Path(tmp)
        folded = fold_model(qm)[0] if qm.module is not None else qm
        fp32 = _fp32_files(folded, cfg, work, "model", None)[format]
        target = _Target(format, "dynamic" if cfg.mode == "dynamic" else "static", fp32, work, cfg, calib)
        scorer = qm.scorer
        base = scorer.score_predict(qm.reference)
        from .sensitivity import layer_sensitivity

        return layer_sensitivity(target.layers, target.build, scorer, base, scorer.metric, scorer.higher_is_better,
                                 scorer.split, scorer.samples, progress)  # fmt: skip


def _clean(metric: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in metric.items()}


def _drop_slower(built: list[QuantizedFile], cfg: QuantConfig, latency: dict[str, Any], runs: int,
                 details: dict[str, Any], fp32_files: Mapping[str, Path], source: Mapping[str, Path],
                 calib: Any, out: Path, work: Path, stem: str, probe: Any) -> list[QuantizedFile]:
    """The int8 files that are not slower than their fp32 file (compress.quantize.speed_guard)."""
    from .speed_guard import retry_variant, slower_than_fp32

    dropped, details["int8_vs_fp32"] = slower_than_fp32(latency, cfg.formats, cfg.mode, runs)
    if "onnx" in dropped and cfg.mode in ("static", "qat") and cfg.per_channel:
        i = next(i for i, b in enumerate(built) if b.format == "onnx")
        variant = dataclasses.replace(cfg, per_channel=False, formats=["onnx"], max_drop=None,
                                      float_layers=list(built[i].float_layers))  # fmt: skip

        def rebuild() -> QuantizedFile:
            return quantize_files({"onnx": source["onnx"]}, variant, calib, out, work, stem)[0][0]

        alt, tried = retry_variant(rebuild, fp32_files["onnx"], probe, cfg.threads, runs, cfg.mode)
        details["int8_variant_tried"] = {"onnx": {k: v for k, v in tried.items() if k != "latency_ms"}}
        if alt is not None:
            alt.info["int8_variant"] = tried["variant"]
            built[i] = alt
            latency[f"{cfg.mode}.onnx"] = tried["latency_ms"]
            details["int8_vs_fp32"]["onnx"] = details["int8_variant_tried"]["onnx"]
            del dropped["onnx"]
    if dropped:
        details["dropped"] = [{"format": fmt, **why} for fmt, why in dropped.items()]
    return [b for b in built if b.format not in dropped]
