"""`run_plan`: build the candidates, time them on the device, judge, report, pick."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.pipeline import SUFFIX

from .candidates import Candidate, build_candidates, metric_value
from .config import PlanConfig
from .pareto import add_ratios, choose, int8_dropped, judge, pareto_front, why_none
from .report import NOISE_NOTE, write_plan_report
from .timing import expand_threads, time_candidates


@dataclass
class PlanResult:
    pick: Candidate | None
    candidates: list[Candidate]
    front: list[Candidate]
    report: dict[str, Any]
    files: dict[str, str]


def run_plan(
    model: Any,
    cfg: PlanConfig,
    formats: Sequence[str],
    calib: dict[str, np.ndarray],
    batches: list[Any],
    val_score: Callable[[Any], float],
    inputs: dict[str, np.ndarray],
    work: Path,
    out: Path,
    threads: Sequence[int],
    name: str = "plan",
    progress: bool = False,
    train_data: tuple[Any, Any] | None = None,
) -> PlanResult:
    """Search, time (interleaved, `cfg.repeats` repeats, medians) and judge; write out/plan.{json,md,png}."""
    from export.pipeline import convert

    work.mkdir(parents=True, exist_ok=True)
    hib = model.workload.metric.higher_is_better
    baseline = metric_value(model.evaluate(), hib)
    references = {fmt: convert(model, fmt, "fp32", work / f"reference.fp32{SUFFIX[fmt]}") for fmt in formats}
    files, notes = build_candidates(model, cfg, formats, calib, batches, val_score, work, progress, train_data)
    if cfg.device != "host":
        from devices.profile import load_profile

        threads = [load_profile(cfg.device).threads]
    cands = expand_threads(files, threads)
    refs = time_candidates(cands, references, inputs, cfg, threads)
    add_ratios(cands, refs)
    judge(cands, cfg, baseline)
    front = pareto_front(cands)
    pick = choose(cands)
    budgets = [refs[k]["p50"] * cfg.max_latency_ratio for k in refs] if cfg.max_latency_ratio else []
    budget_ms = min([*budgets, *([cfg.max_latency_ms] if cfg.max_latency_ms else [])], default=None)
    report: dict[str, Any] = {
        "format": "pocketfleet-latency-plan/1",
        "name": name,
        "device": cfg.device,
        "latency_source": "measured" if cfg.device == "host" else "estimated (devices.estimate)",
        "metric": model.workload.metric.name,
        "higher_is_better": hib,
        "baseline_metric": baseline,  # as "higher is better" (negated for lower-is-better metrics)
        "metric_floor": baseline - cfg.max_drop,
        "budget": {"max_latency_ms": cfg.max_latency_ms, "max_latency_ratio": cfg.max_latency_ratio,
                   "max_drop": cfg.max_drop},  # fmt: skip
        "budget_ms": budget_ms,
        "threads": list(threads),
        "references": refs,
        "search": {**notes, "config": cfg.to_dict(), "files": len(files), "candidates": len(cands)},
        "candidates": [c.row() for c in cands],
        "front": [c.key for c in front],
        "picked": pick.row() if pick else None,
        "why_none": [] if pick else why_none(cands, cfg, baseline),
        "int8_dropped": int8_dropped(cands),
        "note": NOISE_NOTE.format(repeats=cfg.repeats) if cfg.device == "host" else
                "Latencies are devices.estimate predictions (the cost model calibrated by the host probe).",
    }  # fmt: skip
    same = [c for c in cands if c.level >= 1.0 and c.dtype == "fp32" and c.ratio is not None]
    report["noise"] = [f"noise: a second copy of the unpruned fp32 {c.format} file ({c.threads}t) came out at "
                       f"{refs[f'fp32.{c.format}@{c.threads}t']['p50'] / c.p50_ms:.3f}x the unpruned candidate "
                       "(ratios use the candidate); budgets closer than that are within noise"
                       for c in same if c.p50_ms]  # fmt: skip
    if pick is None and not any(c.dtype == "int8" and not c.rejected for c in cands) and report["int8_dropped"]:
        report["why_none"].append("int8 was dropped because it is slower than fp32 on this target (see int8_dropped)")
    files_out = write_plan_report(report, cands, front, pick, out)
    return PlanResult(pick, cands, front, report, files_out)
