"""Never ship an int8 model that is slower than its fp32 model on the host that measured both.

int8 is not automatically faster: on small tensors (digits-mbnet's 8x8 depthwise convs) the requantization
and layout changes cost more than the int8 arithmetic saves. `quantize()` times the fp32 and int8 files of a
run interleaved (compress.quantize.latency); an int8 file whose p50 is above its fp32 p50 is dropped (no
package is written) and the result's `details["dropped"]` says so with both figures. Fewer than
`MIN_RUNS` timed runs are too noisy to decide on: then nothing is dropped and the verdict says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MIN_RUNS = 20
MAX_RATIO = 1.0  # int8 p50 / fp32 p50 above this: slower, dropped


def slower_than_fp32(
    latency: Mapping[str, Mapping[str, Any]], formats: list[str], mode: str, runs: int
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """({format: why} for the int8 files to drop, a verdict per format for the report).

    `latency` is measure_latency's result with keys `fp32.<format>` and `<mode>.<format>`."""
    dropped: dict[str, dict[str, Any]] = {}
    verdict: dict[str, Any] = {}
    for fmt in formats:
        base, cand = latency.get(f"fp32.{fmt}"), latency.get(f"{mode}.{fmt}")
        if not base or not cand:
            continue
        ratio = cand["p50"] / base["p50"] if base["p50"] > 0 else float("inf")
        entry = {"int8_p50_ms": round(cand["p50"], 5), "fp32_p50_ms": round(base["p50"], 5),
                 "ratio": round(ratio, 3), "runs": runs, "threads": cand.get("threads")}  # fmt: skip
        if runs < MIN_RUNS:
            verdict[fmt] = {**entry, "verdict": f"kept: {runs} timed runs are too few to decide (need {MIN_RUNS})"}
        elif ratio > MAX_RATIO:
            why = f"int8 {fmt} p50 {cand['p50']:.4f} ms is {ratio:.2f}x its fp32 p50 {base['p50']:.4f} ms on this host"
            dropped[fmt] = {**entry, "reason": why}
            verdict[fmt] = {**entry, "verdict": "dropped: slower than fp32"}
        else:
            verdict[fmt] = {**entry, "verdict": "kept: not slower than fp32"}
    return dropped, verdict
