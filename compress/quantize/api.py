"""`quantize(model, QuantConfig(...), calib_data)`: BN folding, optional QAT, calibration, mixed
precision, deployable int8/fp16 artifacts in their real runtimes, latency, and signed packages.

    from compress import quantize, QuantConfig
    result = quantize("models/digits-cnn", QuantConfig(mode="static", calibration="mse"), out_dir="out")
    for a in result.artifacts:
        print(a.format, a.dtype, a.metric["value"], a.size_bytes, a.latency_ms, a.float_layers)

Each artifact is one model file plus its `.pfpkg` package (parity against the fp32 PyTorch model and the
workload metric on the evaluation split are checked and recorded by `export.package_artifact`).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import QuantConfig
from .data import CalibData, check_calib_data
from .errors import QuantizeError, UnsupportedOpError
from .sensitivity import SensitivityTable, choose_float_layers, layer_sensitivity

SUFFIX = {"onnx": ".onnx", "tflite": ".tflite"}
RUNTIME = {"onnx": "onnxruntime", "tflite": "LiteRT"}


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


# ------------------------------------------------------------------------------------------ targets


class _Target:
    """One (format, mode) quantizer over a fp32 model file: its layers, build() and analysis."""

    def __init__(
        self, fmt: str, kind: str, fp32: Path, work: Path, cfg: QuantConfig, calib: Mapping[str, np.ndarray]
    ):
        self.format, self.kind, self.fp32, self.work, self.cfg, self.calib = fmt, kind, fp32, work, cfg, calib
        self.counter = 0
        self.unsupported: list[str] = []
        self.details: dict[str, Any] = {}
        if fmt == "onnx":
            self._init_onnx()
        else:
            self._init_tflite()

    # --- ONNX
    def _init_onnx(self) -> None:
        import onnx

        from .onnx_graph import compute_layers

        model = onnx.load(str(self.fp32))
        self.layers = list(compute_layers(model))
        if self.kind == "static":
            from .onnx_static import (
                calibrate_onnx,
                canonicalize,
                int16_overflow_risk,
                io_names,
                ranges_from_stats,
            )

            self.fp32 = canonicalize(self.fp32, self.work / f"canonical-{self.fp32.name}")

            rr = self.cfg.reduce_range
            self.reduce_range = int16_overflow_risk() if rr == "auto" else bool(rr)
            self.details["reduce_range"] = self.reduce_range

            stats = calibrate_onnx(self.fp32, self.calib, threads=self.cfg.threads, batch_size=8)
            self.ranges = ranges_from_stats(
                stats, self.cfg.calibration, self.cfg.percentile, io_names(self.fp32)
            )
        else:
            self.smooth: dict[str, np.ndarray] = {}
            if self.cfg.smooth_alpha is not None:
                self.smooth = self._smoothing(model)

    def _smoothing(self, model: Any) -> dict[str, np.ndarray]:
        from .onnx_dynamic import ALPHAS, smooth_groups, smooth_scales
        from .onnx_graph import collect_stats

        groups = smooth_groups(model, self.layers)
        if not groups:
            return {}
        def channel_absmax(rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            stats = collect_stats(self.fp32, rows, names=list(groups), batch_size=8, threads=self.cfg.threads,
                                  channels=list(groups))  # fmt: skip
            return {n: s.channel_absmax for n, s in stats.items() if s.channel_absmax is not None}

        if self.cfg.smooth_alpha != "auto":
            self.details["smooth_alpha"] = self.cfg.smooth_alpha
            return smooth_scales(groups, channel_absmax(self.calib), float(self.cfg.smooth_alpha))
        # the scales fit one part of the calibration rows and are judged on the rest: judged on the rows they
        # were fit to, strong smoothing looks better than it is on new inputs
        n = len(next(iter(self.calib.values())))
        held = max(1, min(64, n // 3))
        fit_rows = {k: v[: n - held] for k, v in self.calib.items()}
        absmax = channel_absmax(fit_rows)
        fidelity = _OutputFidelity(self.fp32, {k: v[n - held :] for k, v in self.calib.items()}, self.cfg.threads)
        scores: dict[str, float] = {}
        best: tuple[float, float | None] = (-np.inf, None)
        for alpha in (None, *ALPHAS):
            self.smooth = {} if alpha is None else smooth_scales(groups, absmax, alpha)
            score = fidelity(self.build())
            scores[str(alpha)] = round(score, 6)
            if score > best[0]:
                best = (score, alpha)
        self.details["smooth_alpha"] = best[1]
        self.details["smooth_search"] = scores
        return {} if best[1] is None else smooth_scales(groups, channel_absmax(self.calib), best[1])

    # --- TFLite
    def _init_tflite(self) -> None:
        from .tflite_quant import compute_layers

        self.model_bytes = self.fp32.read_bytes()
        self.layers = sorted({c["layer"] for c in compute_layers(self.model_bytes)})
        self.stats = None

    def build(
        self,
        float_layers: Sequence[str] = (),
        only_layers: Sequence[str] | None = None,
        path: Path | None = None,
    ) -> Path:
        if path is None:
            self.counter += 1
            path = self.work / f"trial{self.counter}{SUFFIX[self.format]}"
        if self.format == "onnx":
            if self.kind == "static":
                from .onnx_static import quantize_onnx_static

                return quantize_onnx_static(self.fp32, path, self.ranges, float_layers, only_layers,
                                            self.cfg.per_channel, self.reduce_range)  # fmt: skip
            from .onnx_dynamic import quantize_onnx_dynamic

            out, self.unsupported = quantize_onnx_dynamic(
                self.fp32, path, float_layers, only_layers, self.cfg.per_channel, self.smooth,
                per_token=self.cfg.per_token,
            )
            return out
        from .tflite_quant import quantize_tflite

        out, self.stats = quantize_tflite(
            self.model_bytes, path, self.kind, self.calib, self.cfg.calibration, self.cfg.percentile,
            float_layers, only_layers, stats=self.stats,
        )  # fmt: skip
        return out

    def analyze(self, path: Path) -> dict[str, Any]:
        if self.format == "onnx":
            from .onnx_graph import analyze_runtime

            info = analyze_runtime(path, self.cfg.threads)
            info["float_layers"] += [{"name": x, "op": "unsupported"} for x in self.unsupported]
            return info
        from .tflite_quant import analyze_tflite

        return analyze_tflite(path.read_bytes())


class _OutputFidelity:
    """Mean cosine between a candidate's and the fp32 model's outputs on (up to 64) calibration rows, run
    one row at a time in onnxruntime (batch 1, as deployed: dynamic ranges are per call)."""

    def __init__(self, fp32: Path, calib: Mapping[str, np.ndarray], threads: int, rows: int = 64) -> None:
        self.rows = [
            {k: v[i : i + 1] for k, v in calib.items()}
            for i in range(min(rows, len(next(iter(calib.values())))))
        ]
        self.threads = threads
        self.reference = self._outputs(fp32)

    def _outputs(self, path: Path) -> np.ndarray:
        from .onnx_graph import session

        sess = session(path, threads=self.threads)
        return np.stack([sess.run(None, row)[0].reshape(-1) for row in self.rows]).astype(np.float64)

    def __call__(self, path: Path) -> float:
        out = self._outputs(path)
        num = (out * self.reference).sum(axis=1)
        den = np.linalg.norm(out, axis=1) * np.linalg.norm(self.reference, axis=1)
        return float(np.mean(num / np.maximum(den, 1e-12)))


# ------------------------------------------------------------------------------------------ helpers


def _loaded(model: Any) -> Any:
    if isinstance(model, (str, Path)):
        from compress.zoo import load_model_dir

        return load_model_dir(model)
    if not hasattr(model, "workload") or not hasattr(model, "module"):
        raise QuantizeError(
            f"quantize needs a model directory or a compress.zoo LoadedModel, got {type(model).__name__}"
        )
    return model


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


def _user_float_layers(cfg: QuantConfig, targets: Sequence[_Target]) -> dict[int, list[str]]:
    from .onnx_graph import match_layers

    per_target: dict[int, list[str]] = {}
    unmatched_everywhere = set(cfg.float_layers)
    for i, t in enumerate(targets):
        matched, unmatched = match_layers(cfg.float_layers, t.layers)
        per_target[i] = sorted(matched)
        unmatched_everywhere &= set(unmatched)
    if unmatched_everywhere:
        name = sorted(unmatched_everywhere)[0]
        known = sorted({x for t in targets for x in t.layers})
        raise QuantizeError(f"quantize.float_layers: {name!r} matches no quantizable layer; layers: {known}")
    return per_target


def _check_fallback(cfg: QuantConfig, target: _Target, info: dict[str, Any], requested: set[str]) -> None:
    if cfg.fallback != "error":
        return
    unexpected = [f for f in info["float_layers"] if f["name"] not in requested]
    if target.kind == "static":
        unexpected += info["float_ops"]
    if unexpected:
        first = unexpected[0]
        raise UnsupportedOpError(
            f"{target.format} {target.kind} int8: op {first['op']} in layer {first['name']!r} cannot be quantized "
            f"to int8 for {RUNTIME[target.format]} ({len(unexpected)} such op(s)); set fallback='float' to keep it in "
            "float, or change the model"
        )


# ------------------------------------------------------------------------------------------ public API


def _with_eval_batch(loaded: Any, batch_size: int) -> Any:
    """The LoadedModel with `evaluate` defaulting to `batch_size` (package_artifact scores with it)."""
    base = type(loaded)

    class _Batched(base):  # type: ignore[valid-type, misc]
        def evaluate(
            self, predict: Any = None, batch_size: int = batch_size, split: str = "test"
        ) -> dict[str, Any]:
            return base.evaluate(self, predict=predict, batch_size=batch_size, split=split)

    return _Batched(**{f.name: getattr(loaded, f.name) for f in dataclasses.fields(loaded)})


def fold_model(loaded: Any) -> tuple[Any, list[str]]:
    """A copy of the LoadedModel with BatchNorms folded into the preceding conv/linear layers."""
    from .fold import fold_batchnorm

    module, folded = fold_batchnorm(loaded.module)
    return dataclasses.replace(loaded, module=module), folded


def quantize(
    model: Any,
    config: QuantConfig | Mapping[str, Any] | None = None,
    calib_data: CalibData | None = None,
    out_dir: str | Path | None = None,
    *,
    key: Any = None,
    name: str | None = None,
    version: int = 1,
    latency_runs: int = 30,
    sensitivity: bool = False,
    fp32: Mapping[str, str | Path] | None = None,
    progress: bool = False,
) -> QuantResult:
    """Quantize a model directory / LoadedModel into deployable artifacts (one per format of the config).

    calib_data: {input name: array} (or one array, or a list of dicts) of representative inputs; None
    draws `calib_samples` rows from the workload's train split. `sensitivity=True` also computes the
    per-layer table (always done when `max_drop` is set). Packages are signed with `key` when given.
    `fp32`: {format: file} already exported from this model (skips the export; must be BN-folded or
    exported with export.convert, which folds BN in both formats). `latency_runs=0` skips latency.
    With `latency_runs` >= 20, an int8 file slower than its fp32 file (p50, interleaved) is dropped: no
    artifact or package, and `details["dropped"]` gives both figures (compress.quantize.speed_guard).
    """
    from compress.zoo.base import torch_predict
    from export.latency import measure_latency, single_input
    from export.pipeline import convert, package_artifact

    from .scoring import CachedPredict, Scorer

    cfg = _config(config)
    lm = _loaded(model)
    wl = lm.workload
    calib = check_calib_data(
        calib_data if calib_data is not None else wl.calib_inputs(cfg.calib_samples), wl.inputs
    )
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="pf-quant-"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="trials-", dir=out))
    stem = name or wl.name
    folded, bns = fold_model(lm)
    details: dict[str, Any] = {"folded_batchnorms": bns}
    # the fp32 baseline files come from the folded model (same function; layer names of the conv, not the BN)
    fp32_files = {
        fmt: Path(fp32[fmt])
        if fp32 and fmt in fp32
        else convert(folded, fmt, "fp32", out / f"{stem}.fp32{SUFFIX[fmt]}")
        for fmt in cfg.formats
    }
    source = dict(fp32_files)
    if cfg.mode == "qat":
        from .qat import qat_finetune

        module, details["qat"] = qat_finetune(folded, cfg, calib, progress=progress)
        folded = dataclasses.replace(folded, module=module)
        source = {fmt: convert(folded, fmt, "fp32", work / f"qat{SUFFIX[fmt]}") for fmt in cfg.formats}
    kind = {"static": "static", "qat": "static", "dynamic": "dynamic", "fp16": "fp16"}[cfg.mode]
    dtype = "fp16" if kind == "fp16" else "int8"

    built: list[tuple[str, Path, dict[str, Any], list[str]]] = []  # (format, file, analysis, float layers)
    tables: dict[str, SensitivityTable] = {}
    if kind == "fp16":
        for fmt in cfg.formats:
            path = _fp16_copy(fp32_files[fmt], out / f"{stem}.fp16{SUFFIX[fmt]}")
            built.append((fmt, path, {}, []))
    else:
        targets = [_Target(fmt, kind, source[fmt], work, cfg, calib) for fmt in cfg.formats]
        user_float = _user_float_layers(cfg, targets)
        scorer = Scorer(lm, cfg.sensitivity_split, cfg.sensitivity_samples, cfg.eval_batch_size, cfg.threads)
        baseline_score = None
        for i, t in enumerate(targets):
            floats = user_float[i]
            if cfg.max_drop is not None or sensitivity:
                if baseline_score is None:
                    baseline_score = scorer.score_predict(CachedPredict(lm.predict))
                candidates = [x for x in t.layers if x not in floats]
                table = layer_sensitivity(candidates, t.build, scorer, baseline_score, scorer.metric,
                                          scorer.higher_is_better, cfg.sensitivity_split, scorer.samples, progress)  # fmt: skip
                tables[t.format] = table
                if cfg.max_drop is not None:
                    choice = choose_float_layers(table, cfg.max_drop, t.build, scorer, keep_float=floats)
                    floats = choice.float_layers
                    t.details["max_drop"] = {"max_drop": cfg.max_drop, "met": choice.met, "metric": choice.metric,
                                             "baseline": baseline_score, "steps": choice.steps}  # fmt: skip
            path = t.build(float_layers=floats, path=out / f"{stem}.{cfg.mode}.{dtype}{SUFFIX[t.format]}")
            info = t.analyze(path)
            _check_fallback(cfg, t, info, set(floats))
            if t.format == "onnx":
                from .onnx_graph import compact

                compact(path)
            else:
                from .tflite_quant import compact_tflite

                compact_tflite(path)
            float_names = {f["name"] for f in info["float_layers"]} | set(floats)
            if kind == "static":  # in a full-int8 model every op left in float is a fallback
                float_names |= {f["name"] for f in info["float_ops"]}
            float_names = sorted(float_names)
            built.append((t.format, path, {**info, **t.details}, float_names))

    # latency: every model of this run, interleaved, batch 1 of real test data
    probe = single_input(wl.eval_inputs())
    names = {f"fp32.{fmt}": p for fmt, p in fp32_files.items()} | {
        f"{cfg.mode}.{fmt}": p for fmt, p, _, _ in built
    }
    latency = measure_latency(names, probe, threads=cfg.threads, runs=latency_runs) if latency_runs else {}
    if dtype == "int8" and latency:  # never ship an int8 slower than fp32 here (compress.quantize.speed_guard)
        from .speed_guard import slower_than_fp32

        dropped, details["int8_vs_fp32"] = slower_than_fp32(latency, cfg.formats, cfg.mode, latency_runs)
        if "onnx" in dropped and kind == "static" and cfg.per_channel:  # try the faster static variant first
            from .speed_guard import faster_onnx_variant

            i = next(i for i, b in enumerate(built) if b[0] == "onnx")
            t = next(t for t in targets if t.format == "onnx")
            alt, tried = faster_onnx_variant(t, built[i][3], built[i][1], fp32_files["onnx"], probe, cfg.threads,
                                             latency_runs, cfg.mode)  # fmt: skip
            details["int8_variant_tried"] = {"onnx": {k: v for k, v in tried.items() if k != "latency_ms"}}
            if alt is not None:
                built[i] = ("onnx", alt, {**built[i][2], "int8_variant": tried["variant"]}, built[i][3])
                latency[f"{cfg.mode}.onnx"] = tried["latency_ms"]
                details["int8_vs_fp32"]["onnx"] = details["int8_variant_tried"]["onnx"]
                del dropped["onnx"]
        if dropped:
            details["dropped"] = [{"format": fmt, **why} for fmt, why in dropped.items()]
            built = [b for b in built if b[0] not in dropped]

    reference = CachedPredict(torch_predict(lm.module, wl))
    scored = _with_eval_batch(lm, cfg.eval_batch_size)
    artifacts = []
    for fmt, path, info, float_names in built:
        lat = latency.get(f"{cfg.mode}.{fmt}")
        extra_report = {
            "mode": cfg.mode, "calibration": cfg.calibration if kind == "static" else None,
            "float_layers": float_names, "latency_ms": lat,
        }  # fmt: skip
        result = package_artifact(
            path, scored, fmt, dtype, out / f"{stem}.{cfg.mode}.{fmt}.pfpkg", name=stem, version=version, key=key,
            bounds=_bounds(cfg, dtype), extra_report=extra_report, reference=reference, threads=cfg.threads,
        )  # fmt: skip
        artifacts.append(
            QuantArtifact(
                path=path,
                format=fmt,
                dtype=dtype,
                mode=cfg.mode,
                metric=result.metric,
                size_bytes=path.stat().st_size,
                latency_ms=lat,
                parity=result.parity.to_dict(),
                float_layers=float_names,
                package=result.package,
                calibration=cfg.calibration if kind == "static" else None,
                details=info,
            )  # fmt: skip
        )
    baseline_metric = _clean(scored.evaluate(predict=reference))
    baseline = {
        "metric": baseline_metric,
        "formats": {
            fmt: {"path": str(p), "size_bytes": p.stat().st_size, "latency_ms": latency.get(f"fp32.{fmt}")}
            for fmt, p in fp32_files.items()
        },
    }
    return QuantResult(
        model=str(getattr(lm, "path", wl.name)),
        metric={"name": wl.metric.name, "higher_is_better": wl.metric.higher_is_better},
        baseline=baseline,
        artifacts=artifacts,
        config=cfg,
        sensitivity=tables,
        details=details,
    )


def quantization_sensitivity(
    model: Any,
    config: QuantConfig | Mapping[str, Any] | None = None,
    calib_data: CalibData | None = None,
    format: str = "onnx",
    progress: bool = False,
) -> SensitivityTable:
    """The per-layer sensitivity table alone: the metric with only one layer quantized at a time."""
    from export.pipeline import convert

    from .scoring import CachedPredict, Scorer

    cfg = _config(config)
    if cfg.mode == "fp16":
        raise QuantizeError("sensitivity needs an int8 mode (static, dynamic or qat), not fp16")
    lm = _loaded(model)
    calib = check_calib_data(
        calib_data if calib_data is not None else lm.workload.calib_inputs(cfg.calib_samples),
        lm.workload.inputs,
    )
    folded, _ = fold_model(lm)
    with tempfile.TemporaryDirectory(prefix="pf-sens-") as tmp:
        work = Path(tmp)
        fp32 = convert(folded, format, "fp32", work / f"fp32{SUFFIX[format]}")
        target = _Target(format, "dynamic" if cfg.mode == "dynamic" else "static", fp32, work, cfg, calib)
        scorer = Scorer(lm, cfg.sensitivity_split, cfg.sensitivity_samples, cfg.eval_batch_size, cfg.threads)
        base = scorer.score_predict(CachedPredict(lm.predict))
        return layer_sensitivity(target.layers, target.build, scorer, base, scorer.metric, scorer.higher_is_better,
                                 cfg.sensitivity_split, scorer.samples, progress)  # fmt: skip


def _fp16_copy(fp32_file: Path, path: Path) -> Path:
    """fp16 weights exactly as export does it (weights_to_fp16 of export.onnx / export.tflite), applied
    to the fp32 file instead of exporting again."""
    if fp32_file.suffix == ".onnx":
        import onnx

        from export.onnx import weights_to_fp16

        model = onnx.load(str(fp32_file))
        weights_to_fp16(model)
        model.doc_string = "exported by pocketfleet (weights fp16)"
        onnx.save(model, str(path))
    else:
        from export.tflite import weights_to_fp16

        path.write_bytes(weights_to_fp16(fp32_file.read_bytes()))
    return path


def _clean(metric: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in metric.items()}
