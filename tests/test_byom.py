"""Bring your own model through recipes and the CLI: `[model] factory = "pkg.mod:fn"` (+ kwargs, safetensors
weights), `onnx = "model.onnx"`, `[model.inputs]`, `[data.*]` from .npz / .npy / image folders, the user's
metric; `pocketfleet export --factory ... --input NAME:SHAPE` and `pocketfleet export model.onnx`; and every
user mistake failing at `compress --check` with the field named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from compress.recipe import RecipeError, parse_recipe
from compress.recipe.user import save_weights
from pocketfleet import cli as pocketfleet
from tests.byom_factories import tiny
from tests.test_recipe import dump_toml

FACTORY = "tests.byom_factories:tiny"
INPUTS = {"x": {"shape": [1, 6], "dtype": "float32"}}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("byom")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 6)).astype(np.float32)
    y = rng.integers(0, 3, 48)
    np.savez(d / "train.npz", x=x, labels=y)
    np.save(d / "calib.npy", x[:16])
    np.save(d / "eval.npy", x[16:])
    np.save(d / "eval_labels.npy", y[16:])
    save_weights(tiny(), d / "w.safetensors")
    return d


def recipe(d: Path, model: dict[str, Any] | None = None, data: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "model": {"factory": FACTORY, "kwargs": {"classes": 3}, "weights": "w.safetensors", "metric": "top1",
                  "inputs": INPUTS, **(model or {})},
        "data": data if data is not None else {"calibration": {"file": "calib.npy"}, "finetune": {"file": "train.npz"},
                                               "eval": {"file": "eval.npy", "labels": "eval_labels.npy"}},
        "targets": [{"format": "onnx", "dtype": "fp32"}],
    }
    doc["model"] = {k: v for k, v in doc["model"].items() if v is not None}  # TOML has no null: None drops a key
    doc.update(top)
    return doc


def check_fails(d: Path, doc: dict[str, Any]) -> RecipeError:
    with pytest.raises(RecipeError) as err:
        parse_recipe(doc, d / "r.toml")
    return err.value


def test_factory_recipe_checks_builds_model_and_reads_every_source(data_dir: Path) -> None:
    r = parse_recipe(recipe(data_dir), data_dir / "r.toml")
    lm = r.user.model
    assert [s.name for s in lm.workload.inputs] == ["x"] and lm.workload.outputs[0].shape == ("batch", 3)
    assert lm.workload.metric.name == "top1"
    inputs, labels = lm.workload.data("test")
    assert inputs["x"].shape == (32, 6) and labels is not None and len(labels) == 32
    # the weights were loaded: the module equals the one saved
    assert torch.equal(lm.module[0].weight, tiny()[0].weight)
    assert lm.evaluate()["metric"] == "top1"


def test_factory_that_cannot_be_imported_names_the_module(data_dir: Path) -> None:
    err = check_fails(data_dir, recipe(data_dir, {"factory": "nopkg_xyz.nets:make"}))
    assert err.path == "model.factory" and "cannot be imported" in str(err) and "nopkg_xyz" in str(err)
    err = check_fails(data_dir, recipe(data_dir, {"factory": "tests.byom_factories:nope"}))
    assert "has no attribute 'nope'" in str(err)
    err = check_fails(data_dir, recipe(data_dir, {"factory": "tests.byom_factories:NOT_CALLABLE"}))
    assert "not a callable" in str(err)
    err = check_fails(data_dir, recipe(data_dir, {"factory": "tests.byom_factories"}))
    assert "package.module:callable" in str(err)


def test_factory_that_cannot_be_called_says_how_it_failed(data_dir: Path) -> None:
    err = check_fails(data_dir, recipe(data_dir, {"factory": "tests.byom_factories:broken", "kwargs": {}, "weights": None}))
    assert err.path == "model.factory" and "failed when called" in str(err) and "CUDA is required" in str(err)
    err = check_fails(data_dir, recipe(data_dir, {"factory": "tests.byom_factories:needs_width", "kwargs": {}}))
    assert "TypeError" in str(err) and "width" in str(err)
    err = check_fails(data_dir, recipe(data_dir, {"factory": "tests.byom_factories:not_a_module", "kwargs": {}}))
    assert "returned a dict, not a torch.nn.Module" in str(err)


def test_weights_that_do_not_fit_list_missing_and_unexpected_keys(data_dir: Path) -> None:
    other = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5), torch.nn.Linear(5, 2))
    save_weights(other, data_dir / "other.safetensors")
    err = check_fails(data_dir, recipe(data_dir, {"weights": "other.safetensors"}))
    msg = str(err)
    assert err.path == "model.weights"
    assert "2 unexpected keys: 3.bias, 3.weight" in msg
    assert "shape mismatches: 2.weight [5, 16] (module [3, 16])" in msg
    state = {k: v for k, v in tiny().state_dict().items() if not k.startswith("2.")}
    from safetensors.torch import save_file

    save_file(state, str(data_dir / "partial.safetensors"))
    err = check_fails(data_dir, recipe(data_dir, {"weights": "partial.safetensors"}))
    assert "2 missing keys: 2.weight, 2.bias" in str(err)
    torch.save(tiny().state_dict(), data_dir / "w.pt")
    err = check_fails(data_dir, recipe(data_dir, {"weights": "w.pt"}))
    assert "only .safetensors" in str(err) and "pickle" in str(err)


def test_inputs_data_and_metric_mistakes_name_the_field(data_dir: Path) -> None:
    err = check_fails(data_dir, recipe(data_dir, {"inputs": {}}))
    assert "[model.inputs]" in str(err)
    err = check_fails(data_dir, recipe(data_dir, {"inputs": {"x": {"shape": [1, 7]}}}))
    assert err.path == "data.calibration.file" and "takes [rows, 7]" in str(err)
    err = check_fails(data_dir, recipe(data_dir, {"inputs": {"x": {"shape": [1, 6], "dtype": "float64"}}}))
    assert err.path == "model.inputs.x" and "dtype" in str(err)
    err = check_fails(data_dir, recipe(data_dir, {"metric": "nopkg_xyz:f"}))
    assert "metric" in str(err) and "cannot be imported" in str(err)
    err = check_fails(data_dir, recipe(data_dir, {"zoo": "digits-cnn"}))
    assert "exactly one of" in str(err)
    bad = np.full((4, 6), np.nan, np.float32)
    np.save(data_dir / "nan.npy", bad)
    err = check_fails(data_dir, recipe(data_dir, data={"calibration": {"file": "nan.npy"}}))
    assert err.path == "data.calibration.file" and "NaN" in str(err)


def test_user_metric_and_image_folder(data_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    (tmp_path / "imgs" / "dog" / "notes.txt").write_text("not an image")  # ignored: not .png/.jpg
    save_weights(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
                 tmp_path / "conv.safetensors")
    doc = {
        "model": {"factory": "tests.test_byom:conv_net", "weights": "conv.safetensors", "metric": "tests.byom_factories:half_top1",
                  "inputs": {"image": {"shape": [1, 3, 16, 16]}}},
        "data": {"eval": {"folder": "imgs", "size": [16, 16], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}},
        "targets": [{"format": "onnx"}],
    }
    r = parse_recipe(doc, tmp_path / "r.toml")
    inputs, labels = r.user.model.workload.data("test")
    assert inputs["image"].shape == (6, 3, 16, 16) and list(labels) == [0, 0, 0, 1, 1, 1]
    assert abs(float(inputs["image"].mean())) < 0.6  # normalized around 0
    score = r.user.model.evaluate()
    assert score["metric"] == "half_top1" and 0.0 <= score["value"] <= 0.5


def conv_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())


def test_compress_check_and_run_of_a_factory_recipe(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = recipe(data_dir, steps=[{"type": "quantize", "mode": "dynamic"}], run={"latency_seconds": 0.0, "latency_runs": 1},
                 targets=[{"format": "onnx", "dtype": "int8"}, {"format": "onnx", "dtype": "fp32"}])
    file = data_dir / "run.toml"
    file.write_text(dump_toml(doc))
    assert pocketfleet.main(["compress", str(file), "--check"]) == 0
    assert "factory tests.byom_factories:tiny" in capsys.readouterr().out
    assert pocketfleet.main(["compress", str(file), "--out", str(tmp_path / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["source"] == "factory" and not report["failed"]
    assert report["metric"]["name"] == "top1"
    int8 = next(a for a in report["artifacts"] if a["dtype"] == "int8")
    assert abs(int8["metric"]["value"] - report["baseline"]["metric"]["value"]) <= 0.1
    assert Path(int8["package"]).exists()


def test_cli_export_factory_and_existing_onnx(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from export.package import read_manifest

    pkg = tmp_path / "tiny.pfpkg"
    argv = ["export", "--factory", FACTORY, "--kwargs", '{"classes": 3}', "--weights", str(data_dir / "w.safetensors"),
            "--input", "x:1x6", "--format", "onnx", "--out", str(pkg), "--json"]
    assert pocketfleet.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parity"]["passed"] and out["inputs"][0]["name"] == "x"
    manifest = read_manifest(pkg)
    assert manifest.name == "tiny" and manifest.outputs[0].shape[-1] == 3
    # an ONNX file made elsewhere (here: torch.onnx, input named by the module's own forward), packaged as is
    onnx_file = tmp_path / "given.onnx"
    torch.onnx.export(tiny(), (torch.zeros(2, 6),), str(onnx_file), input_names=["features"], dynamo=False,
                      dynamic_axes={"features": {0: "n"}})
    pkg2 = tmp_path / "given.pfpkg"
    assert pocketfleet.main(["export", str(onnx_file), "--format", "onnx", "--out", str(pkg2), "--json"]) == 0
    out2 = json.loads(capsys.readouterr().out)
    assert out2["parity"]["passed"] and out2["metric"]["metric"] == "fidelity" and read_manifest(pkg2).name == "given"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--factory", FACTORY, "--input", "x"], "expected NAME:SHAPE[:DTYPE]"),
        (["--factory", FACTORY, "--input", "x:1xA"], "must be integers"),
        (["--factory", FACTORY], "--factory needs the model's inputs"),
        (["--factory", "nopkg_xyz:f", "--input", "x:1x6"], "cannot be imported"),
        (["--factory", FACTORY, "--input", "x:1x6", "--kwargs", "[1]"], "must be a JSON object"),
        (["--factory", FACTORY, "--input", "x:1x9"], "cannot run on example_inputs"),
    ],
)
def test_cli_export_factory_errors(argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = pocketfleet.main(["export", *argv, "--format", "onnx", "--out", str(tmp_path / "p.pfpkg")])
    err = capsys.readouterr().err
    assert rc != 0 and message in err and "Traceback" not in err
    assert not (tmp_path / "p.pfpkg").exists()


def test_onnx_recipe_packages_the_file_and_refuses_model_steps(data_dir: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    onnx_file = data_dir / "given.onnx"
    torch.onnx.export(tiny(), (torch.zeros(2, 6),), str(onnx_file), input_names=["x"], dynamo=False,
                      dynamic_axes={"x": {0: "n"}})
    doc = {"model": {"onnx": "given.onnx", "metric": "top1"}, "data": {"eval": {"file": "train.npz"}},
           "run": {"latency_seconds": 0.0, "latency_runs": 1}, "targets": [{"format": "onnx"}]}
    file = data_dir / "onnx.toml"
    file.write_text(dump_toml(doc))
    assert pocketfleet.main(["compress", str(file), "--out", str(tmp_path / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["source"] == "onnx" and report["metric"]["name"] == "top1"
    (art,) = report["artifacts"]
    assert art["parity"]["passed"] and Path(art["package"]).exists()
    assert art["metric"]["value"] == report["baseline"]["metric"]["value"]
    err = check_fails(data_dir, {**doc, "steps": [{"type": "prune", "ratio": 0.5}]})
    assert err.path == "steps[0].type" and "model.factory" in str(err)
    err = check_fails(data_dir, {**doc, "targets": [{"format": "tflite"}]})
    assert "needs the PyTorch module" in str(err)
