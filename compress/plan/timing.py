"""Latency of the plan's candidates on its device: on the host, measured in each file's own runtime
(export.latency.measure_latency: all candidates and the fp32 references interleaved round-robin, the
whole round repeated `repeats` times; the medians of the repeats' p50 / p95 are kept, since the machine
may be loaded); on any other profile, estimated by devices.estimate (the cost model the host probe
calibrates)."""

from __future__ import annotations

import copy
import gc
import random
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .candidates import Candidate
from .config import PlanConfig


def expand_threads(cands: Sequence[Candidate], threads: Sequence[int]) -> list[Candidate]:
    """One candidate per (file, thread count)."""
    out = []
    for t in threads:
        for c in cands:
            d = copy.copy(c)
            d.threads, d.rejected, d.p50_repeats = t, [], []
            out.append(d)
    return out


def time_candidates(
    cands: list[Candidate],
    references: dict[str, Path],
    inputs: dict[str, np.ndarray],
    cfg: PlanConfig,
    threads: Sequence[int],
) -> dict[str, dict[str, Any]]:
    """Fill in p50/p95 of every candidate (one per thread count already); returns the references'
    latency {f"fp32.{format}@{t}t": {"p50", "p95", "p50_repeats"}} (the unpruned fp32 model)."""
    if cfg.device != "host":
        return _estimate(cands, references, cfg.device)
    from export.latency import measure_latency

    refs: dict[str, dict[str, Any]] = {}
    for t in threads:
        group = [c for c in cands if c.threads == t]
        files = {f"ref.{fmt}": p for fmt, p in references.items()} | {c.name: c.path for c in group}
        runs: list[dict[str, dict[str, Any]]] = []
        order = list(files)
        rng = random.Random(t)
        for _ in range(cfg.repeats):  # a new order every repeat: the position in a round biases its timing
            rng.shuffle(order)
            gc.collect()  # the last runtimes gone: an ExecuTorch program pins the process's pool size
            runs.append(measure_latency({k: files[k] for k in order}, inputs, threads=t, runs=cfg.latency_runs,
                                        min_seconds=cfg.latency_seconds * len(files)))  # fmt: skip
        for c in group:
            c.p50_repeats = [r[c.name]["p50"] for r in runs]
            c.p50_ms = statistics.median(c.p50_repeats)
            c.p95_ms = statistics.median(r[c.name]["p95"] for r in runs)
        for fmt in references:
            p50s = [r[f"ref.{fmt}"]["p50"] for r in runs]
            refs[f"fp32.{fmt}@{t}t"] = {
                "p50": statistics.median(p50s),
                "p95": statistics.median(r[f"ref.{fmt}"]["p95"] for r in runs),
                "p50_repeats": p50s,
            }
    return refs


def _estimate(cands: list[Candidate], references: dict[str, Path], device: str) -> dict[str, dict[str, Any]]:
    from devices import estimate

    cache: dict[Path, float] = {}

    def ms(path: Path) -> float:
        if path not in cache:
            cache[path] = float(estimate(path, device, measure=False).estimated_ms)
        return cache[path]

    refs = {}
    for c in cands:
        c.p50_ms = c.p95_ms = ms(c.path)
        c.latency_source = "estimated"
        for fmt, p in references.items():
            refs[f"fp32.{fmt}@{c.threads}t"] = {"p50": ms(p), "p95": ms(p), "p50_repeats": []}
    return refs
