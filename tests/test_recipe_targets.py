"""Recipes target every export format: ExecuTorch (`pte`, fp32 and PT2E int8 made at export) and Core ML
(`coreml`, fp32/fp16/int8/pal4 made at export) beside ONNX and TFLite, in one run, with the report saying
what this host could not measure (a Core ML model's latency and metric off macOS)."""

from __future__ import annotations

from pathlib import Path

import pytest

from compress.recipe import RecipeError, parse_recipe, run_recipe
from export.mlpackage import NOT_RUN


def _doc(model_dir: Path, targets: list[dict]) -> dict:
    return {
        "model": {"path": str(model_dir)},
        "run": {"latency_seconds": 0.1, "latency_runs": 10},
        "steps": [],
        "targets": targets,
    }


def test_pte_and_coreml_targets_are_made_signed_and_measured_where_they_run(
    digits_cnn_dir: Path, keys_dir: Path, tmp_path: Path
) -> None:
    from export.package import open_package

    key = str(keys_dir / "pocketfleet.key")
    targets = [{"format": "pte", "dtype": "int8", "key": key}, {"format": "coreml", "dtype": "pal4", "key": key},
               {"format": "onnx", "dtype": "fp32", "device": "host"}]  # fmt: skip
    report = run_recipe(parse_recipe(_doc(digits_cnn_dir, targets), tmp_path / "r.toml"), tmp_path / "out")
    assert not report["failed"], report["failed"]
    rows = {(a["format"], a["dtype"]): a for a in report["artifacts"]}
    pte, coreml = rows[("pte", "int8")], rows[("coreml", "pal4")]
    assert pte["parity"]["passed"] and pte["metric"]["value"] >= 0.95
    assert pte["latency_ms"]["p50"] > 0 and pte["macs"] is None  # timed in ExecuTorch; devices cannot read .pte
    assert coreml["latency_ms"] == NOT_RUN and coreml["parity"]["status"] == NOT_RUN
    assert rows[("onnx", "fp32")]["latency_ms"]["p50"] > 0 and rows[("onnx", "fp32")]["macs"] > 0
    for row, fmt in ((pte, "pte"), (coreml, "coreml")):
        assert row["signed"]
        with open_package(Path(row["package"])) as pkg:
            assert pkg.manifest.format == fmt and pkg.manifest.dtype == row["dtype"]
    assert pte["size_bytes"] < 0.5 * rows[("onnx", "fp32")]["size_bytes"]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ({"format": "pte", "dtype": "fp16"}, r"targets\[0\]\.dtype.*pte targets take one of \['fp32', 'int8'\]"),
        ({"format": "coreml", "dtype": "int4"}, r"targets\[0\]\.dtype.*'pal4'"),
        ({"format": "mlir"}, r"targets\[0\]\.format.*'pte', 'coreml'"),
    ],
)
def test_a_target_names_the_dtypes_its_format_takes(digits_cnn_dir: Path, tmp_path: Path, target: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_recipe(_doc(digits_cnn_dir, [target]), tmp_path / "r.toml")


def test_onnx_int8_still_needs_a_quantize_step_but_pte_int8_does_not(digits_cnn_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"int8 needs a \[\[steps\]\] entry"):
        parse_recipe(_doc(digits_cnn_dir, [{"format": "onnx", "dtype": "int8"}]), tmp_path / "r.toml")
    recipe = parse_recipe(_doc(digits_cnn_dir, [{"format": "pte", "dtype": "int8"}]), tmp_path / "r.toml")
    assert recipe.producer(0) is None  # a plain export makes it


def test_a_user_model_from_a_factory_gets_pte_and_coreml_targets_and_a_pte_plan(tmp_path: Path) -> None:
    """Not only the zoo: the user's own module (tests.byom_factories:tiny, safetensors weights, .npy data)
    as ExecuTorch int8 and Core ML fp16 targets, and a host latency plan that searches pte beside ONNX."""
    import json

    import numpy as np

    from compress.recipe.user import save_weights
    from tests.byom_factories import tiny
    from tests.test_byom import recipe

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((400, 6)).astype(np.float32), rng.integers(0, 3, 400)
    np.savez(tmp_path / "train.npz", x=x[:200], labels=y[:200])
    np.save(tmp_path / "calib.npy", x[:64])
    np.save(tmp_path / "eval.npy", x[200:])
    np.save(tmp_path / "eval_labels.npy", y[200:])
    save_weights(tiny(), tmp_path / "w.safetensors")
    plan = {"type": "latency_plan", "device": "host", "max_latency_ratio": 5.0, "max_drop": 1.0, "formats": ["onnx", "pte"],
            "threads": [1], "macs_levels": [1.0], "float_layers": False, "quant_formats": ["qdq"], "repeats": 1,
            "latency_runs": 10, "latency_seconds": 0.05}  # fmt: skip
    doc = recipe(tmp_path, steps=[plan], run={"latency_seconds": 0.05, "latency_runs": 10},
                 targets=[{"format": "pte", "dtype": "int8"}, {"format": "coreml", "dtype": "fp16"},
                          {"format": "onnx", "dtype": "int8", "device": "host"}])  # fmt: skip
    report = run_recipe(parse_recipe(doc, tmp_path / "r.toml"), tmp_path / "out")
    assert not report["failed"], report["failed"]
    rows = {(a["format"], a["dtype"], a["mode"]) for a in report["artifacts"]}
    assert {("pte", "int8", "export"), ("coreml", "fp16", "export")} <= rows, rows
    plan_row = next(a for a in report["artifacts"] if a["mode"] == "latency_plan")
    cands = {c["name"] for c in json.loads((tmp_path / "out" / "plan-2" / "plan.json").read_text())["candidates"]}
    assert {"m100.pte.fp32", "m100.pte.int8-pt2e", "m100.onnx.fp32", "m100.onnx.int8-qdq"} <= cands, cands
    assert plan_row["parity"]["passed"]
