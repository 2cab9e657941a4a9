"""The compress-only core of quantization: fp32 model files in, quantized model files out.

    built = quantize_files({"onnx": "m.fp32.onnx"}, QuantConfig(mode="static"), calib, out_dir, scorer=s)

One `_Target` per (format, mode) knows the quantizable layers of its fp32 file and builds a quantized copy
with any set of layers kept in float; `quantize_files` adds the user's float layers, the per-layer
sensitivity table and the accuracy-aware (max_drop) choice, checks the fallback policy and compacts the
files. It knows nothing of packages, signing or where the model came from: `compress.quantize.quantize`
turns a model into the fp32 files, calls this, and packages the results through `export`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import QuantConfig
from .errors import QuantizeError, UnsupportedOpError
from .sensitivity import SensitivityTable, choose_float_layers, layer_sensitivity

SUFFIX = {"onnx": ".onnx", "tflite": ".tflite"}
RUNTIME = {"onnx": "onnxruntime", "tflite": "LiteRT"}


@dataclass
class QuantizedFile:
    """One quantized model file: its format, the layers left in float and what the analysis found."""

    format: str
    path: Path
    dtype: str
    float_layers: list[str]
    info: dict[str, Any] = field(default_factory=dict)


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
                                            self.cfg.per_channel, self.reduce_range, self.cfg.quant_format)  # fmt: skip
            from .onnx_dynamic import quantize_onnx_dynamic

            out, self.unsupported = quantize_onnx_dynamic(
                self.fp32, path, float_layers, only_layers, self.cfg.per_channel, self.smooth,
                reduce_range=None if self.cfg.reduce_range == "auto" else bool(self.cfg.reduce_range),
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




def quantize_files(
    fp32: Mapping[str, Path],
    cfg: QuantConfig,
    calib: Mapping[str, np.ndarray],
    out_dir: Path,
    work: Path,
    stem: str,
    scorer: Any = None,
    baseline: float | None = None,
    sensitivity: bool = False,
    progress: bool = False,
) -> tuple[list[QuantizedFile], dict[str, SensitivityTable]]:
    """Quantize each fp32 file ({format: path}, already BN-folded; QAT weights when mode is qat) as `cfg`
    says, into `out_dir/{stem}.{mode}.{dtype}{suffix}`.

    `scorer(path) -> float` with `.metric`, `.higher_is_better`, `.split`, `.samples` judges candidates for
    the sensitivity table (`sensitivity=True`, and always with `cfg.max_drop`); `baseline` is the float
    model's score on the same rows. Returns the files and the sensitivity tables by format.
    """
    kind = {"static": "static", "qat": "static", "dynamic": "dynamic", "fp16": "fp16"}[cfg.mode]
    dtype = "fp16" if kind == "fp16" else "int8"
    built: list[QuantizedFile] = []
    tables: dict[str, SensitivityTable] = {}
    if kind == "fp16":
        for fmt, path in fp32.items():
            built.append(QuantizedFile(fmt, _fp16_copy(path, out_dir / f"{stem}.fp16{SUFFIX[fmt]}"), dtype, []))
        return built, tables
    targets = [_Target(fmt, kind, Path(path), work, cfg, calib) for fmt, path in fp32.items()]
    user_float = _user_float_layers(cfg, targets)
    if (cfg.max_drop is not None or sensitivity) and (scorer is None or baseline is None):
        raise QuantizeError("sensitivity and max_drop need a scorer and the float model's score")
    for i, t in enumerate(targets):
        floats = user_float[i]
        if cfg.max_drop is not None or sensitivity:
            candidates = [x for x in t.layers if x not in floats]
            table = layer_sensitivity(candidates, t.build, scorer, baseline, scorer.metric,
                                      scorer.higher_is_better, scorer.split, scorer.samples, progress)  # fmt: skip
            tables[t.format] = table
            if cfg.max_drop is not None:
                choice = choose_float_layers(table, cfg.max_drop, t.build, scorer, keep_float=floats)
                floats = choice.float_layers
                t.details["max_drop"] = {"max_drop": cfg.max_drop, "met": choice.met, "metric": choice.metric,
                                         "metric_name": scorer.metric, "baseline": baseline, "steps": choice.steps}  # fmt: skip
        path = t.build(float_layers=floats, path=out_dir / f"{stem}.{cfg.mode}.{dtype}{SUFFIX[t.format]}")
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
        built.append(QuantizedFile(t.format, path, dtype, sorted(float_names), {**info, **t.details}))
    return built, tables
