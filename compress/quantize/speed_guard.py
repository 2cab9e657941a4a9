"""Never ship an int8 model that is slower than its fp32 model on the host that measured both.

int8 is not automatically faster: on small tensors (digits-mbnet's 8x8 depthwise convs) the requantization
and layout changes cost more than the int8 arithmetic saves. `quantize()` times the fp32 and int8 files of a
run interleaved (compress.quantize.latency); an int8 file whose p50 is above its fp32 p50 is dropped (no
package is written) and the result's `details["dropped"]` says so with both figures. Fewer than
`MIN_RUNS` timed runs are too noisy to decide on: then nothing is dropped and the verdict says why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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


# The static ONNX variant tried when the QDQ per-channel model is slower than fp32: per-tensor weights.
# Measured on digits-mbnet (x86, AVX-512 VNNI, 1 thread, loaded 2-core machine, 3000-4000 interleaved runs,
# p50 vs fp32): QDQ per-channel u8s8 0.96-1.02x, QDQ per-tensor 0.87-0.93x, QOperator per-channel
# 0.92-0.94x, QOperator per-tensor 0.85-0.88x, QDQ s8s8 2.3x. onnxruntime fuses QDQ and QOperator into
# the same QLinear ops; per-tensor weights make the requantization of small depthwise convs cheaper.
VARIANT = "per-tensor weights (QDQ)"


def retry_variant(
    rebuild: Callable[[], Any], fp32_file: Any, probe: Any, threads: int, runs: int, mode: str
) -> tuple[Any | None, dict[str, Any]]:
    """Build the variant (`rebuild()` -> a QuantizedFile) and time it against the fp32 file again:
    (file, verdict) when it is not slower, else (None, verdict) and its file is removed."""
    from pathlib import Path

    from export.latency import measure_latency

    alt = rebuild()
    latency = measure_latency({"fp32.onnx": fp32_file, f"{mode}.onnx": alt.path}, probe, threads=threads, runs=runs)
    dropped, verdict = slower_than_fp32(latency, ["onnx"], mode, runs)
    result = {**verdict["onnx"], "variant": VARIANT, "latency_ms": latency[f"{mode}.onnx"]}
    if dropped:
        Path(alt.path).unlink(missing_ok=True)
        return None, result
    return alt, result
