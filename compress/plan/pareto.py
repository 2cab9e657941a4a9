"""Judging candidates: latency ratios, the budgets, the Pareto front of metric x latency x size, and the
pick (the smallest model meeting every budget; never one slower than fp32 on its target)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .candidates import Candidate
from .config import PlanConfig


def add_ratios(cands: Sequence[Candidate], refs: dict[str, dict[str, Any]]) -> None:
    """ratio: p50 / the unpruned fp32 model's p50 in the same format at its fastest searched thread count
    (the unpruned fp32 candidate, or the reference file when the search has no unpruned level): a 2-thread
    candidate is not judged against a 2-thread fp32 that is slower than the 1-thread one; vs_fp32_same_level:
    int8 p50 / the fp32 file of the same pruning level (same format, threads)."""
    fp32 = {(c.level, c.format, c.threads): c for c in cands if c.dtype == "fp32"}
    base: dict[str, float] = {}
    for c in cands:
        unpruned = fp32.get((1.0, c.format, c.threads))
        ref = refs.get(f"fp32.{c.format}@{c.threads}t") or {}
        p50 = unpruned.p50_ms if unpruned is not None and unpruned.p50_ms else ref.get("p50")
        if p50:
            base[c.format] = min(base.get(c.format, p50), p50)
    for c in cands:
        if base.get(c.format) and c.p50_ms is not None:
            c.ratio = c.p50_ms / base[c.format]
        same = fp32.get((c.level, c.format, c.threads))
        if c.dtype != "fp32" and same is not None and same.p50_ms:
            c.vs_fp32_same_level = (c.p50_ms or 0.0) / same.p50_ms


def judge(cands: Sequence[Candidate], cfg: PlanConfig, baseline_metric: float) -> None:
    """Record in `c.rejected` every budget a candidate misses (with the numbers)."""
    keep = 1.0 - cfg.margin
    for c in cands:
        drop = baseline_metric - c.metric
        if drop > cfg.max_drop + 1e-12:
            c.rejected.append(f"metric drop {drop:.4f} > max_drop {cfg.max_drop:g}")
        if c.ratio is not None and c.ratio > 1.0:
            c.rejected.append(f"slower than the fp32 model: {c.ratio:.3f}x its p50")
        if c.vs_fp32_same_level is not None and c.vs_fp32_same_level > 1.0:
            c.rejected.append(f"int8 slower than fp32 at the same pruning: {c.vs_fp32_same_level:.3f}x")
        if cfg.max_latency_ratio is not None and c.ratio is not None and c.ratio > cfg.max_latency_ratio * keep:
            c.rejected.append(f"latency ratio {c.ratio:.3f} > max_latency_ratio {cfg.max_latency_ratio:g}"
                              + (f" less the {cfg.margin:g} margin" if cfg.margin else ""))
        if cfg.max_latency_ms is not None and c.p50_ms is not None and c.p50_ms > cfg.max_latency_ms * keep:
            c.rejected.append(f"p50 {c.p50_ms:.4f} ms > max_latency_ms {cfg.max_latency_ms:g}"
                              + (f" less the {cfg.margin:g} margin" if cfg.margin else ""))
        if c.p50_ms is None:
            c.rejected.append("no latency")


def pareto_front(cands: Sequence[Candidate]) -> list[Candidate]:
    """Candidates no other beats on all of metric (higher), p50 (lower) and size (lower)."""

    def dominates(a: Candidate, b: Candidate) -> bool:
        ge = a.metric >= b.metric and (a.p50_ms or 0) <= (b.p50_ms or 0) and a.size_bytes <= b.size_bytes
        gt = a.metric > b.metric or (a.p50_ms or 0) < (b.p50_ms or 0) or a.size_bytes < b.size_bytes
        return ge and gt

    timed = [c for c in cands if c.p50_ms is not None]
    front = [c for c in timed if not any(dominates(o, c) for o in timed if o is not c)]
    return sorted(front, key=lambda c: (c.p50_ms or 0, c.size_bytes))


def choose(cands: Sequence[Candidate]) -> Candidate | None:
    """The smallest candidate that meets every budget (ties: the fastest, then the best metric)."""
    ok = [c for c in cands if not c.rejected]
    return min(ok, key=lambda c: (c.size_bytes, c.p50_ms or 0, -c.metric)) if ok else None


def why_none(cands: Sequence[Candidate], cfg: PlanConfig, baseline_metric: float) -> list[str]:
    """With no pick: the closest any candidate came to each budget, in numbers."""
    lines = []
    accurate = [c for c in cands if baseline_metric - c.metric <= cfg.max_drop + 1e-12]
    timed = [c for c in cands if c.ratio is not None]
    if not accurate:
        best = max(cands, key=lambda c: c.metric)
        lines.append(f"no candidate holds the metric: best {best.name} drops {baseline_metric - best.metric:.4f} "
                     f"> max_drop {cfg.max_drop:g}")  # fmt: skip
    if timed:
        fast = min(timed, key=lambda c: c.ratio or 0)
        lines.append(f"fastest candidate {fast.name} ({fast.threads}t): p50 {fast.p50_ms:.4f} ms = "
                     f"{fast.ratio:.3f}x fp32 (budget: ratio {cfg.max_latency_ratio}, ms {cfg.max_latency_ms})")  # fmt: skip
    fast_accurate = [c for c in accurate if c.ratio is not None]
    if fast_accurate:
        c = min(fast_accurate, key=lambda c: c.ratio or 0)
        lines.append(f"fastest candidate within max_drop: {c.name} ({c.threads}t) at {c.ratio:.3f}x fp32, "
                     f"p50 {c.p50_ms:.4f} ms; it misses: {'; '.join(c.rejected)}")  # fmt: skip
    return lines


def int8_dropped(cands: Sequence[Candidate]) -> list[str]:
    """Lines for the int8 candidates that were rejected because they are slower than fp32."""
    return [
        f"int8 {c.name} ({c.threads}t) dropped: p50 {c.p50_ms:.4f} ms is {c.vs_fp32_same_level:.3f}x the fp32 "
        f"file of the same pruning"
        for c in cands
        if c.dtype == "int8" and c.vs_fp32_same_level is not None and c.vs_fp32_same_level > 1.0
    ]
