"""examples/byom_end_to_end.py, reduced (1 epoch, 200 images): a user's transformers ResNet trained, pruned,
distilled, quantized to int8, signed, installed in a running agent and served; what the agent serves is the
int8 model that quantize measured."""

from __future__ import annotations

from pathlib import Path

from examples.byom_end_to_end import main
from export.package import read_manifest


def test_user_model_trained_pruned_distilled_int8_signed_installed_and_served(tmp_path: Path) -> None:
    report = main(tmp_path, epochs=1, rows=200)
    full, pruned = report["params"]
    assert pruned < 0.5 * full
    manifest = read_manifest(report["package"])
    assert manifest.name == "digits-resnet" and manifest.dtype == "int8"
    assert report["served"] == {"name": "digits-resnet", "version": 1}
    # the agent serves the int8 file quantize scored: same rows, same runtime, same top-1 (one row of slack)
    assert abs(report["served_top1"] - report["int8_top1"]) <= 1 / 40 + 1e-9


def test_the_user_code_is_under_40_lines() -> None:
    text = (Path(__file__).resolve().parents[1] / "examples" / "byom_end_to_end.py").read_text()
    user = text.split("# --- user code")[1].split("# --- end of user code")[0].splitlines()[1:]
    assert len([x for x in user if x.strip() and not x.strip().startswith("#")]) < 40
