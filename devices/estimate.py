"""Estimate a model's latency, memory and storage on a device; on the host, also time it for real.

e = estimate("digits-cnn.pfpkg", "raspberry-pi-4")
e.estimated_ms, e.fits, e.to_dict()
e = estimate("model.onnx", "host")          # measures too: e.measured_ms, e.ratio (measured/estimated)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from devices.analysis import ModelAnalysis, analyze_model
from devices.cost import estimate_cost
from devices.profile import DeviceProfile, load_profile
from devices.source import ModelSource, open_model


@dataclass
class Estimate:
    """Cost of one model on one device. `measured_ms` / `ratio` are set when the model was timed."""

    model: str
    format: str
    device: str
    seq_len: int
    macs: int
    params_bytes: int
    peak_activation_bytes: int
    op_count: int
    estimated_ms: float
    compute_ms: float
    memory_ms: float
    overhead_ms: float
    memory_level: str
    ram_needed_bytes: int
    ram_bytes: int
    fits_ram: bool
    storage_needed_bytes: int
    storage_budget_bytes: int
    fits_storage: bool
    format_supported: bool
    dtypes_supported: bool
    fits: bool
    dtypes: dict[str, int]
    package: dict[str, Any] | None = None
    measured_ms: float | None = None  # median wall-clock latency
    measured_cpu_ms: float | None = None  # median CPU time of the calling thread (robust to a busy machine)
    measured_runs: int | None = None
    measured_threads: int | None = None
    ratio: float | None = None  # measured / estimated (wall clock)
    cpu_ratio: float | None = None  # measured CPU time / estimated: the ratio to trust on a shared machine
    warnings: list[str] = field(default_factory=list)
    analysis: ModelAnalysis | None = field(default=None, repr=False, compare=False)

    def to_dict(self, include_ops: bool = False) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "analysis"}
        if include_ops and self.analysis is not None:
            out["ops"] = [asdict(op) for op in self.analysis.ops]
        return out


def estimate(
    pkg_or_model_path: str | Path,
    device: str | DeviceProfile,
    seq_len: int = 128,
    measure: bool | None = None,
    min_runs: int = 20,
    min_seconds: float = 1.0,
) -> Estimate:
    """Estimate `pkg_or_model_path` (.pfpkg, .onnx or .tflite) on `device` (a name, "host", or a profile).

    `measure` (default: only for the host profile) also runs the model in its runtime at batch 1 with the
    profile's thread count: warm-up, then the median of at least `min_runs` runs and `min_seconds`.
    """
    profile = load_profile(device)
    if measure is None:
        measure = profile.name == "host"
    with open_model(pkg_or_model_path) as src:
        analysis = analyze_model(src.model_path, src.format, seq_len)
        cost = estimate_cost(analysis, profile, src.storage_bytes)
        out = Estimate(
            model=str(pkg_or_model_path),
            format=src.format,
            device=profile.name,
            seq_len=seq_len,
            macs=analysis.macs,
            params_bytes=analysis.params_bytes,
            peak_activation_bytes=analysis.peak_activation_bytes,
            op_count=analysis.op_count,
            estimated_ms=cost.estimated_ms,
            compute_ms=cost.compute_ms,
            memory_ms=cost.memory_ms,
            memory_level=cost.memory_level,
            overhead_ms=cost.overhead_ms,
            ram_needed_bytes=cost.ram_needed_bytes,
            ram_bytes=cost.ram_bytes,
            fits_ram=cost.fits_ram,
            storage_needed_bytes=cost.storage_needed_bytes,
            storage_budget_bytes=cost.storage_budget_bytes,
            fits_storage=cost.fits_storage,
            format_supported=cost.format_supported,
            dtypes_supported=cost.dtypes_supported,
            fits=cost.fits,
            dtypes=analysis.dtypes,
            package=src.package,
            warnings=analysis.warnings + cost.warnings,
            analysis=analysis,
        )
        if measure:
            m = measure_model(src, seq_len, profile.threads, min_runs, min_seconds)
            out.measured_ms, out.measured_cpu_ms, out.measured_runs = m.wall_ms, m.cpu_ms, m.runs
            out.measured_threads = profile.threads
            if cost.estimated_ms > 0:
                out.ratio = m.wall_ms / cost.estimated_ms
                out.cpu_ratio = m.cpu_ms / cost.estimated_ms
    return out


@dataclass
class Measurement:
    wall_ms: float  # median wall-clock latency
    cpu_ms: float  # median CPU time of the calling thread; with 1 thread the runtimes compute on it
    runs: int


def measure_model(
    src: ModelSource, seq_len: int, threads: int = 1, min_runs: int = 20, min_seconds: float = 1.0
) -> Measurement:
    """Median milliseconds of one batch-1 inference of `src` in its runtime (export.latency).

    Wall-clock time is the latency; the calling thread's CPU time is reported too because on a shared,
    overloaded machine the wall clock also counts the time the process waited for a core. Inputs are the
    package's samples when their shape matches, else seeded random data (ones for `*mask*` inputs).
    """
    from export.latency import measure_latency
    from export.runtimes import io_dtype, load_runtime

    runtime = load_runtime(src.model_path, src.format, threads=threads)
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in runtime.inputs:
        shape = [
            d if isinstance(d, int) and d >= 0 else (1 if axis == 0 else seq_len)
            for axis, d in enumerate(spec.shape)
        ]
        sample = src.samples.get(spec.name)
        if sample is not None and list(sample.shape[1:]) == shape[1:]:
            feeds[spec.name] = np.ascontiguousarray(sample[: shape[0]])
            continue
        dtype = np.dtype(io_dtype(spec))
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in spec.name.lower():
            feeds[spec.name] = np.ones(shape, dtype)
        else:
            feeds[spec.name] = rng.integers(1, 100, shape).astype(dtype)
    del runtime
    stats = measure_latency({"model": src.model_path}, feeds, threads=threads, runs=min_runs,
                            min_seconds=min_seconds, formats={"model": src.format})["model"]
    return Measurement(stats["p50"], stats["cpu_p50"] or stats["p50"], stats["runs"])
