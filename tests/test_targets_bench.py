"""benchmarks/targets.py: the user model it adds to the zoo models, and rows for files that failed to build."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _targets():
    spec = importlib.util.spec_from_file_location("bench_targets", ROOT / "benchmarks" / "targets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_byom_user_model_exports_and_runs_like_its_module(tmp_path: Path) -> None:
    from export.pipeline import convert
    from export.runtimes import load_runtime

    targets = _targets()
    model, calib = targets.load_subject("byom-resnet", tmp_path)
    assert model.name == "byom-resnet" and calib.shape[1:] == (1, 32, 32)
    rows = {k: v[:4] for k, v in model.eval_inputs().items()}
    path = convert(model, "onnx", "fp32", tmp_path / "m.onnx")
    got = load_runtime(path).run(rows)["logits"]
    np.testing.assert_allclose(got, model.predict(rows)["logits"], atol=1e-4)


def test_a_file_that_failed_to_build_is_a_row_with_its_error() -> None:
    targets = _targets()

    def boom() -> None:
        raise ValueError("no converter for op Foo\nlong traceback text")

    err = targets._attempt(boom)
    assert err == "ValueError: no converter for op Foo"
    rows = [
        {
            "model": "m",
            "format": "pte",
            "dtype": "int8",
            "error": err,
            "size_bytes": None,
            "parity": "not built",
        },
        {
            "model": "m",
            "format": "onnx",
            "dtype": "fp32",
            "size_bytes": 2048,
            "p50_ms_t1": 0.5,
            "p95_ms_t1": 0.7,
            "p50_vs_fp32_t1": 1.0,
            "cold_start_ms": 9.0,
            "rss_mb": 50.0,
            "parity": {"agreement": 1.0},
        },
    ]
    text = targets.table(rows, [1])
    assert "pte | int8 | - | not built: ValueError: no converter for op Foo" in text
    assert "m | onnx | fp32 | 2 | 0.5000 | 0.7000 | 1.0 | 9.0 | 50.0 | agree 1.000" in text
