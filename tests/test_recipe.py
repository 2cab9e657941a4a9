"""Compression recipes: `pocketfleet compress RECIPE.toml --out DIR` end to end on digits-cnn (real
pruning, fine-tuning, distillation, int8 ONNX + TFLite in their runtimes), and every bad recipe failing
before any work with the file and the field path named."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pocketfleet import cli as pocketfleet
from pocketfleet.config import loads_toml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def dump_toml(doc: dict[str, Any]) -> str:
    """A minimal TOML writer for recipe documents (scalars, lists, tables, arrays of tables)."""
    lines: list[str] = []

    def is_tables(value: Any) -> bool:
        return isinstance(value, dict) or (
            isinstance(value, list) and bool(value) and isinstance(value[0], dict)
        )

    def table(prefix: str, data: dict[str, Any]) -> None:
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in data.items() if not is_tables(v))
        for key, value in data.items():
            name = f"{prefix}.{key}" if prefix else key
            if isinstance(value, dict):
                lines.append(f"[{name}]")
                table(name, value)
            elif is_tables(value):
                for item in value:
                    lines.append(f"[[{name}]]")
                    table(name, item)

    table("", doc)
    return "\n".join(lines) + "\n"


def write_recipe(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(dump_toml(doc))
    assert loads_toml(path.read_text()) == doc  # the writer round-trips
    return path


# --- end to end ---------------------------------------------------------------------------------------


@dataclass
class Run:
    recipe: Path
    out: Path
    report: dict[str, Any]
    keys: dict[str, str]


@pytest.fixture(scope="module")
def cnn_run(digits_cnn_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The digits-cnn example (int8 PTQ to ONNX + TFLite for a Raspberry Pi 4) with model steps put in
    front, on the session's trained digits-cnn, run through the CLI with --json."""
    from export import generate_keys

    tmp = tmp_path_factory.mktemp("recipe")
    keys = generate_keys(tmp / "keys")
    doc = loads_toml((EXAMPLES / "digits-cnn-int8.toml").read_text())
    doc["model"] = {"path": str(digits_cnn_dir)}
    doc["data"] = {"calibration": {"split": "train", "samples": 64}, "finetune": {"samples": 512}}
    doc["run"] = {"latency_seconds": 0.1, "latency_runs": 10}
    quantize = doc["steps"]
    doc["steps"] = [
        {"type": "prune", "ratio": 0.25, "round_to": 4},
        {"type": "distill", "teacher": "original", "epochs": 1, "batch_size": 64},
        {"type": "sparsify", "sparsity": 0.4},
        {"type": "finetune", "epochs": 1, "lr": 1e-3},
        *quantize,
    ]
    doc["targets"][0]["key"] = keys["private_key"]
    recipe = write_recipe(tmp / "cnn.toml", doc)
    out = tmp / "out"
    stdout = _run_cli(["compress", str(recipe), "--out", str(out), "--json"])
    return Run(recipe, out, json.loads(stdout), keys)


def _run_cli(argv: list[str]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = pocketfleet.main(argv)
    assert rc == 0, buf.getvalue()
    return buf.getvalue()


def test_report_json_has_every_field(cnn_run: Run) -> None:
    report = cnn_run.report
    assert report["failed"] == []
    assert json.loads((cnn_run.out / "report.json").read_text()) == report  # --json prints the report
    assert report["model"]["workload"] == "digits-cnn"
    assert report["metric"] == {"name": "top1", "higher_is_better": True}
    measured = ("metric", "size_bytes", "size_zstd_bytes", "macs", "params", "latency_ms", "path")
    base = report["baseline"]
    for key in measured:
        assert key in base, key
    assert base["metric"]["value"] > 0.95
    assert [s["type"] for s in report["steps"]] == ["prune", "distill", "sparsify", "finetune", "quantize"]
    for step in report["steps"]:
        for key in measured:
            assert step[key] is not None, (step["type"], key)
        assert 0 < step["latency_ms"]["p50"] <= step["latency_ms"]["p90"]
        assert 0.0 <= step["metric"]["value"] <= 1.0
    assert [a["format"] for a in report["artifacts"]] == ["onnx", "tflite"]
    for a in report["artifacts"]:
        assert Path(a["path"]).is_file() and Path(a["package"]).exists()
        assert a["dtype"] == "int8" and a["mode"] == "static"
        assert a["size_bytes"] == Path(a["path"]).stat().st_size
        assert 0 < a["latency_ms"]["p50"] <= a["latency_ms"]["p90"]
        assert a["parity"]["passed"] is True
        assert isinstance(a["float_layers"], list)
        assert a["device"]["device"] == "raspberry-pi-4" and a["device"]["estimated_ms"] > 0
        assert a["device"]["fits"] is True
    png = (cnn_run.out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_steps_change_the_model_as_configured(cnn_run: Run) -> None:
    base, steps = cnn_run.report["baseline"], {s["type"]: s for s in cnn_run.report["steps"]}
    # structured pruning: fewer MACs and parameters in the exported file, and smaller
    assert steps["prune"]["macs"] < 0.85 * base["macs"]
    assert steps["prune"]["size_bytes"] < 0.85 * base["size_bytes"]
    assert steps["prune"]["details"]["groups_pruned"] > 0
    # distillation recovers what pruning lost (on the test split, from the val-selected epoch)
    assert steps["distill"]["metric"]["value"] >= steps["prune"]["metric"]["value"] - 0.01
    # sparsity keeps the dense size but compresses better, and fine-tuning keeps the zeros
    assert steps["sparsify"]["size_bytes"] == steps["distill"]["size_bytes"]
    assert steps["sparsify"]["size_zstd_bytes"] < 0.85 * steps["distill"]["size_zstd_bytes"]
    assert steps["finetune"]["details"]["sparsity"] >= 0.39
    assert steps["finetune"]["size_zstd_bytes"] < 0.85 * steps["distill"]["size_zstd_bytes"]
    # int8 of the final model: within 1.5 pt of it, under a third of its fp32 size
    final = steps["finetune"]
    for a in cnn_run.report["artifacts"]:
        assert a["metric"]["value"] >= final["metric"]["value"] - 0.015, a["format"]
        assert a["size_bytes"] < 0.35 * final["size_bytes"], a["format"]
        assert a["macs"] == pytest.approx(final["macs"], rel=0.01)
    assert steps["quantize"]["details"]["artifacts"] == [0, 1]


def test_signed_target_verifies(cnn_run: Run) -> None:
    from export import verify_package

    signed, unsigned = cnn_run.report["artifacts"]
    assert signed["signed"] and not unsigned["signed"]
    manifest = verify_package(signed["package"], cnn_run.keys["public_key"])
    assert manifest.dtype == "int8" and manifest.format == "onnx"
    assert manifest.report["metric"]["value"] == pytest.approx(signed["metric"]["value"])


def test_human_output_is_a_table(cnn_run: Run) -> None:
    from compress.recipe.report import render

    text = render(cnn_run.report)
    for stage in ("baseline", "steps[0] prune", "steps[3] finetune", "targets[1] static", "raspberry-pi-4"):
        assert stage in text
    assert str(cnn_run.out / "report.png") in text


def test_plain_exports_and_a_failed_target(digits_cnn_dir: Path, tmp_path: Path) -> None:
    """fp32 ONNX is the final snapshot packaged as is, fp16 goes through export_model; a target that
    cannot be made (here: a float layer the model does not have, found only once the model is exported)
    is listed under "failed" with the reason, the others are still made, and the CLI exits 1."""
    doc = {
        "name": "cnn-plain",
        "model": {"path": str(digits_cnn_dir)},
        "data": {"calibration": {"samples": 16}},
        "run": {"latency_seconds": 0.05, "latency_runs": 5},
        "steps": [{"type": "quantize", "mode": "dynamic", "float_layers": ["no_such_layer"]}],
        "targets": [
            {"format": "onnx", "dtype": "int8"},
            {"format": "onnx"},
            {"format": "onnx", "dtype": "fp16", "device": "x86-server"},
        ],
    }
    out = tmp_path / "out"
    argv = ["compress", str(write_recipe(tmp_path / "plain.toml", doc)), "--out", str(out), "--json"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert pocketfleet.main(argv) == 1
    report = json.loads(buf.getvalue())
    [failed] = report["failed"]
    assert failed["target"] == 0 and failed["step"] == "steps[0]" and "no_such_layer" in failed["error"]
    assert report["steps"][0]["details"]["artifacts"] == [] and report["steps"][0]["metric"] is None
    fp32, fp16 = report["artifacts"]
    base = report["baseline"]
    assert Path(fp32["path"]).read_bytes() == Path(base["path"]).read_bytes()
    assert fp32["metric"]["value"] == base["metric"]["value"] and fp32["mode"] == "export"
    assert fp16["dtype"] == "fp16" and fp16["size_bytes"] < 0.6 * fp32["size_bytes"]
    assert abs(fp16["metric"]["value"] - base["metric"]["value"]) <= 0.01
    assert fp16["device"]["device"] == "x86-server" and fp32["device"] is None
    assert fp16["device"]["estimated_ms"] > 0 and fp16["device"]["storage_needed_bytes"] > fp16["size_bytes"]
    assert (out / "report.png").stat().st_size > 10_000


def test_examples_validate() -> None:
    from compress.recipe import load_recipe

    names = sorted(p.name for p in EXAMPLES.glob("*.toml"))
    assert {"digits-cnn-int8.toml", "digits-mbnet-prune-kd-int8.toml", "minilm-int8-onnx.toml"} <= set(names)
    for name in names:
        recipe = load_recipe(EXAMPLES / name)
        assert recipe.targets and recipe.model.zoo


def test_check_validates_without_writing(digits_cnn_dir: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.toml", _base(digits_cnn_dir))
    out = tmp_path / "out"
    text = _run_cli(["compress", str(recipe), "--out", str(out), "--check"])
    assert "prune -> quantize (static)" in text and not out.exists()


def test_a_registered_step_type_plugs_in(digits_cnn_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import dataclass as dc

    from compress.recipe import RecipeError, parse_recipe
    from compress.recipe.steps import Step, base, register_step, step_types

    step_types()  # the built-in types are registered first
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    @dc
    class ScaleConfig:
        factor: float = 1.0
        layers: list[str] | None = None

        def validate(self) -> None:
            if self.factor <= 0:
                raise RecipeError(f"ScaleConfig.factor must be > 0, got {self.factor}")

    @register_step
    class ScaleStep(Step):
        type = "scale"
        config_cls = ScaleConfig

    doc = _base(digits_cnn_dir)
    doc["steps"].insert(0, {"type": "scale", "factor": 2})
    recipe = parse_recipe(doc, "r.toml")
    assert recipe.steps[0].config.factor == 2.0 and recipe.model_steps[0].type == "scale"
    doc["steps"][0] = {"type": "scale", "factor": -1.0}
    with pytest.raises(RecipeError, match=r"^r\.toml: steps\[0\]\.factor: must be > 0, got -1\.0$"):
        parse_recipe(doc, "r.toml")


# --- bad recipes fail before any work ------------------------------------------------------------------


def _base(model_dir: Path) -> dict[str, Any]:
    return {
        "model": {"path": str(model_dir)},
        "data": {"calibration": {"samples": 32}},
        "steps": [{"type": "prune", "ratio": 0.25}, {"type": "quantize", "mode": "static"}],
        "targets": [{"format": "onnx", "dtype": "int8", "device": "raspberry-pi-4"}],
    }


def _edit(path: tuple[Any, ...], value: Any = None, delete: bool = False):
    def apply(doc: dict[str, Any]) -> None:
        node = doc
        for key in path[:-1]:
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]
        if delete:
            del node[path[-1]]
        elif isinstance(node, list) and path[-1] == len(node):
            node.append(value)
        else:
            node[path[-1]] = value

    return apply


BAD = {
    "unknown top-level key": (_edit(("colour",), "red"), "colour: unknown key"),
    "unknown model key": (_edit(("model", "zo"), "x"), "model.zo: unknown key"),
    "unknown step option": (_edit(("steps", 0, "ratioo"), 0.3), "steps[0].ratioo: unknown key; known keys:"),
    "unknown data key": (_edit(("data", "calibration", "rows"), 3), "data.calibration.rows: unknown key"),
    "unknown target key": (_edit(("targets", 0, "fromat"), "onnx"), "targets[0].fromat: unknown key"),
    "wrong type": (_edit(("steps", 0, "ratio"), "half"), "steps[0].ratio: expected a number, got 'half'"),
    "ratio out of range": (
        _edit(("steps", 0, "ratio"), 1.5),
        "steps[0].ratio: must be a number in [0, 1), got 1.5",
    ),
    "wrong type in a list": (
        _edit(("steps", 0, "ignore"), ["conv1", 3]),
        "steps[0].ignore[1]: expected a string, got 3",
    ),
    "bool for an int": (_edit(("data", "seed"), True), "data.seed: expected an integer, got True"),
    "negative samples": (_edit(("data", "calibration", "samples"), -1), "data.calibration.samples: must be"),
    "missing data file": (
        _edit(("data", "calibration", "file"), "nowhere.npz"),
        "data.calibration.file: no such file",
    ),
    "missing model": (_edit(("model",), delete=True), "model: missing"),
    "unknown model": (_edit(("model",), {"zoo": "digits-xl"}), "model.zoo: unknown workload 'digits-xl'"),
    "not a model dir": (_edit(("model",), {"path": "."}), "model.path: "),
    "both zoo and path": (_edit(("model", "zoo"), "digits-cnn"), "model: give exactly one of"),
    "unknown step type": (_edit(("steps", 0, "type"), "shrink"), "steps[0].type: unknown step type 'shrink'"),
    "step without type": (_edit(("steps", 0, "type"), delete=True), "steps[0].type: missing"),
    "steps not tables": (_edit(("steps",), "prune"), "steps: expected an array of tables"),
    "unknown device": (
        _edit(("targets", 0, "device"), "toaster"),
        "targets[0].device: unknown device 'toaster'",
    ),
    "device cannot run the format": (
        _edit(("targets", 0, "device"), "cortex-m7"),
        "targets[0].format: device 'cortex-m7' runs only tflite",
    ),
    "bad dtype": (_edit(("targets", 0, "dtype"), "int4"), "targets[0].dtype: onnx targets take one of"),
    "bad format": (_edit(("targets", 0, "format"), "mlir"), "targets[0].format: must be one of"),
    "int8 without quantize": (
        _edit(("steps", 1), delete=True),
        'targets[0].dtype: int8 needs a [[steps]] entry with type = "quantize"',
    ),
    "fp16 quantize for an int8 target": (
        _edit(("steps", 1, "mode"), "fp16"),
        "steps[1].mode: mode 'fp16' makes fp16 artifacts, but no [[targets]] entry has dtype = \"fp16\"",
    ),
    "quantize formats set in the step": (
        _edit(("steps", 1, "formats"), ["onnx"]),
        "steps[1].formats: set by the [[targets]] entries",
    ),
    "bad calibration method": (
        _edit(("steps", 1, "calibration"), "guess"),
        "steps[1].calibration: must be one of ['minmax', 'percentile', 'entropy', 'mse'], got 'guess'",
    ),
    "model step after quantize": (
        _edit(("steps", 2), {"type": "finetune", "epochs": 1}),
        "steps[2]: a finetune step cannot follow the quantize step steps[1]",
    ),
    "schedule without training": (
        _edit(("steps", 0), {"type": "sparsify", "schedule": "polynomial", "end_step": 10}),
        "steps[0].schedule: schedule 'polynomial' moves the masks during fine-tuning",
    ),
    "teacher key in finetune": (
        _edit(("steps", 0), {"type": "finetune", "alpha": 0.5}),
        "steps[0].alpha: only a distill step",
    ),
    "bad teacher": (
        _edit(("steps", 0), {"type": "distill", "teacher": "nobody"}),
        "steps[0].teacher: expected 'original' or 'previous' or a model directory",
    ),
    "unknown student config key": (
        _edit(("steps", 0), {"type": "distill", "student_config": {"depth": 2}}),
        "steps[0].student_config.depth: unknown key for a digits-cnn config",
    ),
    "missing targets": (_edit(("targets",), delete=True), "targets: missing"),
    "empty targets": (_edit(("targets",), []), "targets: empty"),
    "duplicate target": (
        _edit(("targets", 1), {"format": "onnx", "dtype": "int8"}),
        "targets[1]: same name, format and dtype as targets[0]",
    ),
    "missing key file": (_edit(("targets", 0, "key"), "no.key"), "targets[0].key: cannot read private key"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipe_fails_before_any_work(
    case: str, digits_cnn_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit, expected = BAD[case]
    doc = _base(digits_cnn_dir)
    edit(doc)
    recipe = write_recipe(tmp_path / "bad.toml", doc)
    out = tmp_path / "out"
    rc = pocketfleet.main(["compress", str(recipe), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith(f"error: {recipe}: "), err
    assert expected in err, err
    assert "\n" not in err  # one message, no traceback
    assert not out.exists()  # nothing was made, trained or exported


def test_bad_data_file_contents_are_named(digits_cnn_dir: Path, tmp_path: Path) -> None:
    from compress.recipe import RecipeError, load_recipe

    bad = tmp_path / "calib.npz"
    np.savez(bad, image=np.zeros((4, 1, 6, 6), np.float32))  # digits images are 1 x 8 x 8
    doc = _base(digits_cnn_dir)
    doc["data"]["calibration"]["file"] = str(bad)
    with pytest.raises(RecipeError, match=r"data\.calibration\.file: .*calib\.npz: input 'image' has shape"):
        load_recipe(write_recipe(tmp_path / "r.toml", doc))


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    from compress.recipe import RecipeError, load_recipe

    path = tmp_path / "broken.toml"
    path.write_text("[model\nzoo = 1\n")
    with pytest.raises(RecipeError, match=r"broken\.toml: not valid TOML"):
        load_recipe(path)


def test_out_dir_must_be_empty(digits_cnn_dir: Path, tmp_path: Path) -> None:
    from compress.recipe import run_recipe
    from compress.recipe.runner import OutputDirError

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="is not empty"):
        run_recipe(write_recipe(tmp_path / "r.toml", _base(digits_cnn_dir)), out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_docs_name_every_recipe_key() -> None:
    """docs/recipes.md documents every key a recipe accepts (step options come from the configs)."""
    from compress.recipe.schema import TOP_LEVEL, DataSource, ModelSpec, RunSettings, Target
    from compress.recipe.steps import step_types
    from pocketfleet.config import fields_of

    text = (ROOT / "docs" / "recipes.md").read_text()
    keys = {"top level": set(TOP_LEVEL)}
    for cls in (ModelSpec, DataSource, RunSettings, Target):
        keys[cls.__name__] = set(fields_of(cls))
    for name, cls in step_types().items():
        keys[f"steps type = {name}"] = (set(fields_of(cls.config_cls)) - set(cls.excluded)) | set(cls.extra)
        assert f'`type = "{name}"`' in text, name
    missing = {where: sorted(k for k in ks if f"`{k}`" not in text) for where, ks in keys.items()}
    assert not any(missing.values()), missing
