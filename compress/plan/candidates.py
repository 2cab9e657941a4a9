"""The candidates of a latency plan: model files (pruning level x format x dtype x int8 variant), each
with its metric and size; timing them is `compress.plan.timing`'s job."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.pipeline import SUFFIX
from pocketfleet import PocketfleetError

from .config import MEASURED_ONLY, PlanConfig

QUANTIZER_FORMATS = ("onnx", "tflite")  # int8 through compress.quantize; pte's int8 is made at export (PT2E)


@dataclass
class Candidate:
    """One model file the plan may ship, at one thread count (latency filled in by the timing)."""

    name: str
    level: float  # fraction of the MACs the pruning kept (1.0: unpruned)
    format: str
    dtype: str
    variant: str  # "fp32", "qdq", "qoperator", "qdq+float" ...
    path: Path
    metric: float
    size_bytes: int
    macs: int
    float_layers: list[str] = field(default_factory=list)
    threads: int = 1
    p50_ms: float | None = None
    p95_ms: float | None = None
    p50_repeats: list[float] = field(default_factory=list)
    latency_source: str = "measured"  # "measured" (host runtime) | "estimated" (devices.estimate)
    ratio: float | None = None  # p50 / p50 of the unpruned fp32 model, same format, its fastest threads
    vs_fp32_same_level: float | None = None  # int8: p50 / p50 of the fp32 file of the same pruning level
    package: Path | None = None  # the package quantize() made (int8), when there is one
    module: Any = field(default=None, repr=False)  # the pruned LoadedModel this file came from
    rejected: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.name}@{self.threads}t"

    def row(self) -> dict[str, Any]:
        return {
            "name": self.name, "level": self.level, "format": self.format, "dtype": self.dtype,
            "variant": self.variant, "threads": self.threads, "metric": round(self.metric, 5),
            "size_bytes": self.size_bytes, "macs": self.macs,
            "p50_ms": _r(self.p50_ms), "p95_ms": _r(self.p95_ms),
            "p50_repeats_ms": [_r(x) for x in self.p50_repeats], "latency_source": self.latency_source,
            "ratio": _r(self.ratio), "vs_fp32_same_level": _r(self.vs_fp32_same_level),
            "float_layers": self.float_layers, "path": str(self.path), "rejected": self.rejected,
        }  # fmt: skip


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


def metric_value(metric: dict[str, Any], higher_is_better: bool) -> float:
    value = float(metric["value"])
    return value if higher_is_better else -value


def pruned_models(
    model: Any,
    cfg: PlanConfig,
    batches: list[Any],
    val_score: Callable[[Any], float],
    progress: bool = False,
    train_data: tuple[Any, Any] | None = None,
) -> list[tuple[float, Any, dict[str, Any]]]:
    """(level, LoadedModel, prune details) per MACs level: uniform ratio (searched for the level) or
    per-layer ratios from compress.prune's sensitivity (computed once)."""
    from compress.prune import PruneConfig, layer_sensitivity, plan_from_sensitivity, plan_pruning

    x = model.example_inputs(2)
    sens = None
    out = []
    for level in cfg.macs_levels:
        if level >= 1.0:
            out.append((1.0, model, {"macs_ratio": 1.0}))
            continue
        pc = PruneConfig(target_macs=level, importance=cfg.importance, round_to=cfg.round_to)
        details: dict[str, Any] = {"plan": cfg.prune_plan}
        if cfg.prune_plan == "sensitivity":
            if sens is None:
                sens = layer_sensitivity(model.module, x, val_score, cfg.sensitivity_ratios, cfg.importance,
                                         cfg.round_to, data=batches, progress=progress)  # fmt: skip
            planned = plan_from_sensitivity(sens, model.module, x, level, round_to=cfg.round_to)
            pc = dataclasses.replace(pc, ratios=planned.ratios, target_macs=None)
            details["ratios"] = planned.ratios
        plan = plan_pruning(model.module, pc, x, batches)
        module = plan.apply(batches).eval()
        details["macs_ratio"] = round(plan.summary()["macs_ratio"], 4)
        if cfg.recover_epochs and train_data is not None:
            from compress.distill import DistillConfig, distill

            dc = DistillConfig(epochs=cfg.recover_epochs, lr=cfg.recover_lr)
            details["recovered_from"] = round(val_score(module), 5)
            module = distill(module, model.module, dc, train_data, evaluate=val_score, progress=progress).eval()
            details["recovered_to"] = round(val_score(module), 5)
        out.append((level, dataclasses.replace(model, module=module), details))
    return out


def build_candidates(
    model: Any,
    cfg: PlanConfig,
    formats: Sequence[str],
    calib: dict[str, Any],
    batches: list[Any],
    val_score: Callable[[Any], float],
    work: Path,
    progress: bool = False,
    train_data: tuple[Any, Any] | None = None,
) -> tuple[list[Candidate], dict[str, Any]]:
    """Every candidate file (fp32 and int8 variants per format and pruning level) with its test metric
    and size, and the details of what was tried (including int8 variants the quantizer refused)."""
    from compress.quantize import QuantConfig, quantize
    from devices import analyze_model
    from export.pipeline import convert

    hib = model.workload.metric.higher_is_better
    quant_formats = list(cfg.quant_formats)
    notes: dict[str, Any] = {"quant_formats": quant_formats, "levels": [], "errors": []}
    cands: list[Candidate] = []

    def add(c: Candidate) -> bool:
        if cfg.max_candidates and len(cands) >= cfg.max_candidates:
            return False
        cands.append(c)
        return True

    for level, lm, details in pruned_models(model, cfg, batches, val_score, progress, train_data):
        notes["levels"].append({"level": level, **details})
        tag = f"m{int(round(level * 100)):03d}"
        fp32_metric = metric_value(lm.evaluate(), hib)
        fp32_files = {fmt: convert(lm, fmt, "fp32", work / f"{tag}.fp32{SUFFIX[fmt]}") for fmt in formats}
        macs = _level_macs(fp32_files, lm, work / f"{tag}.macs.onnx")
        for fmt, path in fp32_files.items():
            if not add(Candidate(f"{tag}.{fmt}.fp32", level, fmt, "fp32", "fp32", path, fp32_metric,
                                 path.stat().st_size, macs, module=lm)):  # fmt: skip
                return cands, notes
        variants: list[tuple[str, dict[str, Any]]] = []
        for q in quant_formats:
            extra = {"quant_format": q}
            variants.append((q, extra))
            if cfg.float_layers:
                variants.append((f"{q}+float", {**extra, "max_drop": cfg.max_drop}))
        for variant, extra in variants:
            fmts = [f for f in formats if f in QUANTIZER_FORMATS and (variant.startswith("qdq") or f == "onnx")]
            if not fmts:
                continue
            qc = QuantConfig(mode="static", formats=fmts, **extra)
            out = Path(tempfile.mkdtemp(prefix=f"{tag}-{variant}-", dir=work))
            try:
                result = quantize(lm, qc, calib, out, name=f"{tag}-{variant}", latency_runs=0,
                                  fp32={f: fp32_files[f] for f in fmts})  # fmt: skip
            except PocketfleetError as exc:  # e.g. parity out of bounds
                notes["errors"].append({"level": level, "variant": variant, "error": str(exc)})
                continue
            for qa in result.artifacts:
                a = analyze_model(qa.path)
                v = variant if qa.format == "onnx" else variant.replace("qdq", "full")  # TFLite: full-integer
                c = Candidate(f"{tag}.{qa.format}.int8-{v}", level, qa.format, "int8", v, qa.path,
                              metric_value(qa.metric, hib), qa.path.stat().st_size, int(a.macs),
                              float_layers=list(qa.float_layers), package=qa.package, module=lm)  # fmt: skip
                if not add(c):
                    return cands, notes
        if "pte" in formats:  # XNNPACK quantizer + PT2E at export; its metric measured in ExecuTorch
            path = work / f"{tag}.int8.pte"
            try:
                convert(lm, "pte", "int8", path)
                metric = metric_value(file_metric(lm, path), hib)
            except PocketfleetError as exc:
                notes["errors"].append({"level": level, "variant": "pte-int8", "error": str(exc)})
                continue
            if not add(Candidate(f"{tag}.pte.int8-pt2e", level, "pte", "int8", "pt2e", path, metric,
                                 path.stat().st_size, macs, module=lm)):  # fmt: skip
                return cands, notes
    return cands, notes


def file_metric(model: Any, path: Path) -> dict[str, Any]:
    """The workload metric of a model file run in its own runtime (export.runtimes), on the test split."""
    from export.runtimes import load_runtime

    runtime = load_runtime(path, threads=1)
    try:
        return model.evaluate(runtime.run)
    finally:
        del runtime  # an ExecuTorch program holds the process's XNNPACK pool at its thread count


def _level_macs(files: dict[str, Path], model: Any, spare: Path) -> int:
    """MACs of one pruning level, read from a file devices.analyze_model reads (an ONNX export when the
    search has only formats it cannot read)."""
    from devices import analyze_model
    from export.pipeline import convert

    readable = [p for f, p in files.items() if f not in MEASURED_ONLY]
    return int(analyze_model(readable[0] if readable else convert(model, "onnx", "fp32", spare)).macs)
