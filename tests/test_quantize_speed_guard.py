"""int8 is never shipped when it is slower than fp32 on the host that timed both."""

from __future__ import annotations

from pathlib import Path

import pytest

from compress.quantize.speed_guard import MIN_RUNS, slower_than_fp32


def _lat(fp32: float, int8: float) -> dict:
    return {"fp32.onnx": {"p50": fp32, "threads": 1}, "static.onnx": {"p50": int8, "threads": 1}}


def test_a_slower_int8_is_dropped_with_both_figures() -> None:
    dropped, verdict = slower_than_fp32(_lat(0.0486, 0.0637), ["onnx"], "static", runs=50)
    assert dropped["onnx"]["ratio"] == pytest.approx(1.311, abs=1e-3)
    assert "1.31x its fp32 p50 0.0486 ms" in dropped["onnx"]["reason"]
    assert verdict["onnx"]["verdict"] == "dropped: slower than fp32"


def test_a_faster_int8_is_kept_and_too_few_runs_decide_nothing() -> None:
    dropped, verdict = slower_than_fp32(_lat(0.05, 0.03), ["onnx"], "static", runs=50)
    assert dropped == {} and verdict["onnx"]["verdict"].startswith("kept: not slower")
    dropped, verdict = slower_than_fp32(_lat(0.05, 0.09), ["onnx"], "static", runs=MIN_RUNS - 1)
    assert dropped == {} and "too few" in verdict["onnx"]["verdict"]


@pytest.mark.slow
def test_quantize_drops_exactly_the_int8_files_its_own_timing_finds_slower(digits_cnn_dir: Path, tmp_path: Path) -> None:
    from compress import QuantConfig, quantize

    result = quantize(digits_cnn_dir, QuantConfig(mode="static"), out_dir=tmp_path, latency_runs=MIN_RUNS)
    verdict = result.details["int8_vs_fp32"]
    assert set(verdict) == {"onnx", "tflite"}
    shipped = {a.format for a in result.artifacts}
    dropped = {d["format"] for d in result.details.get("dropped", [])}
    assert shipped | dropped == {"onnx", "tflite"} and not shipped & dropped
    for fmt, v in verdict.items():
        assert (fmt in dropped) == (v["ratio"] > 1.0)
        if fmt in dropped:
            assert not (tmp_path / f"digits-cnn.static.{fmt}.pfpkg").exists()
