"""`PlanConfig`: the budgets and the search space of a latency plan (a recipe's `latency_plan` step)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from compress.quantize.config import QUANT_FORMATS  # the ONNX int8 graph forms the quantizer writes
from pocketfleet import PocketfleetError

FORMATS = ("onnx", "tflite", "pte")
MEASURED_ONLY = ("pte",)  # formats devices.estimate cannot read: timed on the host only
PRUNE_PLANS = ("uniform", "sensitivity")


class PlanError(PocketfleetError):
    """A latency plan cannot be made as configured."""


@dataclass
class PlanConfig:
    """device: the target the latencies are for ("host": measured in its runtime; a profile name:
      estimated by devices.estimate, the cost model calibrated by the host probe).
    max_latency_ms / max_latency_ratio: the latency budget: p50 in ms, and p50 as a fraction of the
      unpruned fp32 model in the same runtime at its fastest thread count (at least one is needed).
    margin: noise margin: a candidate must beat each latency budget by this fraction (0.05: 5% under).
    max_drop: the most the workload metric may fall below the fp32 model (metric units).
    formats: runtimes searched ([] = the claimed target's format): "onnx", "tflite", "pte" (ExecuTorch with
      XNNPACK: fp32 and PT2E int8, host only); quant_formats: ONNX int8 graph forms ("qdq", "qoperator":
      compress.quantize's quant_format); threads: thread counts searched ([] = the run's).
    macs_levels: fractions of the MACs kept by structured pruning (1.0 = unpruned); prune_plan "uniform"
      (one ratio for every group) or "sensitivity" (per-layer ratios from compress.prune's sensitivity).
    float_layers: also try int8 with the fewest layers left float that hold `max_drop` (quantize max_drop).
    repeats / latency_runs / latency_seconds: interleaved timing: every repeat times all candidates
      round-robin; the plan uses the medians of the repeats' p50 and p95.
    max_candidates: search budget (0 = no limit): levels are tried from least to most pruned."""

    device: str = "host"
    max_latency_ms: float | None = None
    max_latency_ratio: float | None = None
    max_drop: float = 0.01
    margin: float = 0.0
    formats: list[str] = field(default_factory=list)
    quant_formats: list[str] = field(default_factory=lambda: ["qdq", "qoperator"])
    threads: list[int] = field(default_factory=list)
    macs_levels: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5])
    prune_plan: str = "uniform"
    importance: str = "l2"
    round_to: int = 8
    sensitivity_ratios: list[float] = field(default_factory=lambda: [0.25, 0.5])
    recover_epochs: int = 0
    recover_lr: float = 2e-3
    float_layers: bool = True
    repeats: int = 3
    latency_runs: int = 30
    latency_seconds: float = 0.5
    max_candidates: int = 0

    def validate(self) -> PlanConfig:
        if self.max_latency_ms is None and self.max_latency_ratio is None:
            raise PlanError("give a latency budget: max_latency_ms and/or max_latency_ratio")
        if self.max_latency_ms is not None and self.max_latency_ms <= 0:
            raise PlanError(f"PlanConfig.max_latency_ms must be > 0, got {self.max_latency_ms}")
        if self.max_latency_ratio is not None and not 0 < self.max_latency_ratio <= 10:
            raise PlanError(f"PlanConfig.max_latency_ratio must be in (0, 10], got {self.max_latency_ratio}")
        if not 0 <= self.margin < 1:
            raise PlanError(f"PlanConfig.margin must be in [0, 1), got {self.margin}")
        if not 0 <= self.max_drop <= 1:
            raise PlanError(f"PlanConfig.max_drop must be in [0, 1], got {self.max_drop}")
        _subset(self.formats, FORMATS, "formats")
        unread = [f for f in self.formats if f in MEASURED_ONLY]
        if unread and self.device != "host":
            raise PlanError(f"PlanConfig.formats: {unread[0]!r} candidates are timed on the host only (devices.estimate "
                            f"cannot read {unread[0]} programs); use device = \"host\" or drop it")  # fmt: skip
        _subset(self.quant_formats, QUANT_FORMATS, "quant_formats")
        if not self.quant_formats:
            raise PlanError("PlanConfig.quant_formats: give at least one of ['qdq', 'qoperator']")
        if any(t < 1 for t in self.threads):
            raise PlanError(f"PlanConfig.threads must be integers >= 1, got {self.threads}")
        if not self.macs_levels or any(not 0 < x <= 1 for x in self.macs_levels):
            raise PlanError(f"PlanConfig.macs_levels must be fractions in (0, 1], got {self.macs_levels}")
        self.macs_levels = sorted(set(self.macs_levels), reverse=True)
        if self.prune_plan not in PRUNE_PLANS:
            raise PlanError(f"PlanConfig.prune_plan must be one of {list(PRUNE_PLANS)}, got {self.prune_plan!r}")
        if any(not 0 < r < 1 for r in self.sensitivity_ratios) or not self.sensitivity_ratios:
            raise PlanError(f"PlanConfig.sensitivity_ratios must be in (0, 1), got {self.sensitivity_ratios}")
        for name, low in (("round_to", 1), ("recover_epochs", 0), ("repeats", 1), ("latency_runs", 1), ("max_candidates", 0)):
            if getattr(self, name) < low:
                raise PlanError(f"PlanConfig.{name} must be an integer >= {low}, got {getattr(self, name)}")
        if not 0 < self.recover_lr <= 1:
            raise PlanError(f"PlanConfig.recover_lr must be in (0, 1], got {self.recover_lr}")
        if not 0 <= self.latency_seconds <= 60:
            raise PlanError(f"PlanConfig.latency_seconds must be in [0, 60], got {self.latency_seconds}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _subset(values: list[str], allowed: tuple[str, ...], name: str) -> None:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise PlanError(f"PlanConfig.{name}: {bad[0]!r} is not one of {list(allowed)}")
