"""Latency and fit estimates of an analysed model on a device profile (a roofline with per-op overhead).

    latency = invoke_overhead[format]
              + sum over dispatched ops of ( max(compute, memory) + op_overhead[format] )
    compute = MACs / throughput[op dtype] + element-wise ops / throughput[fp32]
    memory  = bytes moved (activations in + weights + outputs) / memory bandwidth

Fused and folded ops (see devices.analysis) pay neither compute nor overhead. An op whose dtype has no
throughput figure on the device runs at the fp32 figure, with a warning.
RAM needed = runtime RAM + peak activations (+ parameters unless the device executes weights in place
from flash); storage needed = the package (or model file) size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from devices.analysis import ModelAnalysis
from devices.profile import DeviceProfile


@dataclass
class CostEstimate:
    """Modelled latency breakdown and resource fit of one model on one device."""

    device: str
    format: str
    estimated_ms: float
    compute_ms: float  # sum of per-op compute terms where compute bound
    memory_ms: float  # sum of per-op memory terms where memory bound
    memory_level: str  # "cache" | "mixed" (activations cached, weights from DRAM) | "dram"
    overhead_ms: float  # invoke + per-op dispatch
    ram_needed_bytes: int
    ram_bytes: int
    fits_ram: bool
    storage_needed_bytes: int
    storage_budget_bytes: int
    fits_storage: bool
    format_supported: bool
    dtypes_supported: bool
    warnings: list[str] = field(default_factory=list)
    per_op_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def fits(self) -> bool:
        return self.fits_ram and self.fits_storage and self.format_supported and self.dtypes_supported

    def to_dict(self, include_ops: bool = False) -> dict[str, Any]:
        out = asdict(self)
        out["fits"] = self.fits
        if not include_ops:
            out.pop("per_op_ms")
        return out


def estimate_cost(analysis: ModelAnalysis, profile: DeviceProfile, storage_bytes: int) -> CostEstimate:
    """Apply the roofline + overhead model of `profile` to `analysis`."""
    fmt = analysis.format
    warnings: list[str] = []
    format_supported = fmt in profile.runtimes
    if not format_supported:
        warnings.append(f"{profile.name} does not run {fmt} models (runtimes: {', '.join(profile.runtimes)})")
    op_overhead_s = _per_format(profile.op_overhead_us, fmt) * 1e-6
    invoke_s = _per_format(profile.invoke_overhead_us, fmt) * 1e-6
    fp32 = profile.throughput_gmacs["fp32"] * 1e9
    has_cache = profile.cache_bytes > 0
    acts_cached = has_cache and analysis.peak_activation_bytes <= profile.cache_bytes
    all_cached = has_cache and analysis.params_bytes + analysis.peak_activation_bytes <= profile.cache_bytes
    dram, cache = profile.mem_bandwidth_gbs * 1e9, profile.cache_bandwidth_gbs * 1e9
    act_bw = cache if acts_cached else dram
    weight_bw = cache if all_cached else dram
    missing: set[str] = set()
    compute_s = memory_s = overhead_s = 0.0
    per_op = []
    for op in analysis.ops:
        if not op.executed:
            per_op.append(0.0)
            continue
        gmacs, known = profile.throughput(op.dtype)
        if op.macs and not known:
            missing.add(op.dtype)
        c = op.macs / (gmacs * 1e9) + op.elementwise / fp32
        m = (op.bytes_moved - op.weight_bytes) / act_bw + op.weight_bytes / weight_bw
        if c >= m:
            compute_s += c
        else:
            memory_s += m
        overhead_s += op_overhead_s
        per_op.append((max(c, m) + op_overhead_s) * 1e3)
    overhead_s += invoke_s
    used = {op.dtype for op in analysis.ops if op.macs}
    unsupported = sorted(used - set(profile.supported_dtypes))
    if unsupported:
        warnings.append(f"{profile.name} does not list {', '.join(unsupported)} among its supported dtypes")
    if missing:
        warnings.append(
            f"no {', '.join(sorted(missing))} throughput for {profile.name}: costed at its fp32 rate"
        )
    runtime_ram = profile.runtime_ram_bytes.get(fmt, max(profile.runtime_ram_bytes.values(), default=0))
    ram_needed = runtime_ram + analysis.peak_activation_bytes
    if profile.weights_in_ram:
        ram_needed += analysis.params_bytes
    return CostEstimate(
        device=profile.name,
        format=fmt,
        estimated_ms=(compute_s + memory_s + overhead_s) * 1e3,
        compute_ms=compute_s * 1e3,
        memory_ms=memory_s * 1e3,
        memory_level="cache" if all_cached else "mixed" if acts_cached else "dram",
        overhead_ms=overhead_s * 1e3,
        ram_needed_bytes=int(ram_needed),
        ram_bytes=profile.ram_bytes,
        fits_ram=ram_needed <= profile.ram_bytes,
        storage_needed_bytes=int(storage_bytes),
        storage_budget_bytes=profile.storage_budget_bytes,
        fits_storage=storage_bytes <= profile.storage_budget_bytes,
        format_supported=format_supported,
        dtypes_supported=not unsupported,
        warnings=warnings,
        per_op_ms=per_op,
    )


def _per_format(table: dict[str, float], fmt: str) -> float:
    """The figure for `fmt`; for a format the device does not run, the largest figure it has."""
    return table.get(fmt, max(table.values(), default=0.0))
