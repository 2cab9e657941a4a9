"""Export to ONNX / TFLite with parity in the real runtime, on the real reference workloads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export import (
    ExportError,
    ExportResult,
    ParityBounds,
    ParityError,
    Recorded,
    Samples,
    UnsignedPackageError,
    check_samples,
    export_model,
    extract_package,
    generate_keys,
    package_artifact,
    verify_package,
)
from export.parity import compare_outputs
from export.runtimes import load_runtime
from pocketfleet import cli as pocketfleet

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return generate_keys(tmp_path_factory.mktemp("export-keys"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest, keys: dict):
    """Export (workload, format, dtype) once per module: a signed package plus the bare model file."""
    cache: dict[tuple[str, str, str], ExportResult] = {}
    out = tmp_path_factory.mktemp("exports")

    def get(workload: str, fmt: str, dtype: str) -> ExportResult:
        if (workload, fmt, dtype) not in cache:
            from compress.zoo import load_model_dir

            model_dir = request.getfixturevalue(workload.replace("-", "_") + "_dir")
            stem = f"{workload}-{fmt}-{dtype}"
            cache[workload, fmt, dtype] = export_model(
                load_model_dir(model_dir), fmt, dtype, out=out / f"{stem}.pfpkg", version=2, key=keys["private_key"],
                model_out=out / f"{stem}.{fmt}",
            )  # fmt: skip
        return cache[workload, fmt, dtype]

    return get


def _check_package(result: ExportResult, keys: dict, tmp_path: Path) -> None:
    """The package verifies, its samples pass in the runtime, and its specs match the model file."""
    manifest = verify_package(result.package, keys["public_key"])
    dest = tmp_path / "x"
    extract_package(result.package, dest, keys["public_key"])
    runtime = load_runtime(dest / manifest.model)
    assert manifest.inputs == runtime.inputs and manifest.outputs == runtime.outputs
    samples = Samples.from_bytes((dest / manifest.samples["path"]).read_bytes(), manifest.samples)
    assert samples.count == 4
    check_samples(runtime.run, samples)
    assert manifest.report["parity"]["passed"] is True
    assert manifest.report["size_bytes"] == result.size_bytes == manifest.files[manifest.model].size


DIGITS = ["digits-cnn", "digits-mbnet"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
@pytest.mark.parametrize("workload", DIGITS)
def test_digits_fp32_export_matches_pytorch_exactly(
    exported, workload: str, fmt: str, keys: dict, tmp_path: Path
) -> None:
    result = exported(workload, fmt, "fp32")
    (logits,) = result.parity.outputs
    assert logits.name == "logits" and logits.kind == "classifier"
    assert result.parity.samples >= 300  # the whole test split
    assert logits.agreement == 1.0
    assert logits.max_abs < 1e-4
    assert result.metric["value"] == pytest.approx(result.reference_metric["value"], abs=1e-9)
    assert result.reference_metric["value"] > 0.9
    _check_package(result, keys, tmp_path)
    manifest = verify_package(result.package, keys["public_key"])
    batch = "batch" if fmt == "onnx" else 1  # LiteRT: fixed batch, stated in the manifest
    assert [s.to_dict() for s in manifest.inputs] == [
        {"name": "image", "shape": [batch, 1, 8, 8], "dtype": "float32"}
    ]
    assert [s.to_dict() for s in manifest.outputs] == [
        {"name": "logits", "shape": [batch, 10], "dtype": "float32"}
    ]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
@pytest.mark.parametrize("workload", DIGITS)
def test_digits_fp16_export_agrees_and_is_smaller(
    exported, workload: str, fmt: str, keys: dict, tmp_path: Path
) -> None:
    result = exported(workload, fmt, "fp16")
    (logits,) = result.parity.outputs
    assert logits.agreement >= 0.995
    assert 0 < logits.max_abs < 0.1  # weights really were rounded, and only slightly
    assert result.size_bytes < 0.7 * exported(workload, fmt, "fp32").size_bytes
    assert abs(result.metric["value"] - result.reference_metric["value"]) <= 0.01
    _check_package(result, keys, tmp_path)


@pytest.mark.slow
def test_onnx_export_has_dynamic_batch_and_checks_clean(exported) -> None:
    import onnx

    result = exported("digits-cnn", "onnx", "fp32")
    model = onnx.load(str(result.model_file))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    runtime = load_runtime(result.model_file)
    x = np.random.default_rng(0).random((7, 1, 8, 8), dtype=np.float32)
    assert runtime.run({"image": x})["logits"].shape == (7, 10)


@pytest.mark.slow
def test_minilm_onnx_and_tflite_exports_keep_embeddings(minilm_dir: Path, keys: dict, tmp_path: Path) -> None:
    from compress.zoo import load_model_dir

    lm = load_model_dir(minilm_dir)
    reference = Recorded(lm.predict)  # PyTorch runs once for both exports
    onnx_result = export_model(
        lm, "onnx", "fp32", out=tmp_path / "minilm.pfpkg", key=keys["private_key"], reference=reference
    )
    tflite_result = export_model(lm, "tflite", "fp32", reference=reference)  # parity only, no package
    for result in (onnx_result, tflite_result):
        (emb,) = result.parity.outputs
        assert emb.name == "embedding" and emb.kind == "embedding"
        assert emb.min_cosine >= 0.9999 and emb.max_abs < 1e-4
        assert result.metric["value"] >= 0.9999  # cosine to the stored fp32 reference embeddings
    manifest = verify_package(onnx_result.package, keys["public_key"])
    assert [s.shape for s in manifest.inputs] == [("batch", "sequence"), ("batch", "sequence")]
    extract_package(onnx_result.package, tmp_path / "x", keys["public_key"])
    runtime = load_runtime(tmp_path / "x" / manifest.model)
    ids = np.array([[101, 7592, 2088, 102]], np.int64)  # a shorter sequence than the export example
    out = runtime.run({"input_ids": ids, "attention_mask": np.ones_like(ids)})["embedding"]
    assert out.shape == (1, 384) and abs(float(np.linalg.norm(out)) - 1.0) < 1e-4


@pytest.mark.slow
def test_parity_failure_raises_and_writes_no_package(exported, digits_cnn_dir: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    from compress.zoo import load_model_dir

    result = exported("digits-cnn", "onnx", "fp32")
    lm = load_model_dir(digits_cnn_dir)
    # a bound tighter than float32 arithmetic can meet
    out = tmp_path / "tight.pfpkg"
    with pytest.raises(ParityError, match=r"output 'logits' max abs error [0-9.e-]+ >= 1e-12") as info:
        package_artifact(
            result.model_file, lm, "onnx", "fp32", out, version=1, bounds=ParityBounds(max_abs=1e-12)
        )
    assert "logits" in str(info.value) and not out.exists()
    # a perturbed model file: the classifier's weights are shuffled
    model = onnx.load(str(result.model_file))
    biggest = max(model.graph.initializer, key=lambda t: len(t.dims) == 2 and np.prod(t.dims))
    w = numpy_helper.to_array(biggest)
    biggest.CopyFrom(
        numpy_helper.from_array(
            np.random.default_rng(0).permutation(w.ravel()).reshape(w.shape), biggest.name
        )
    )
    onnx.save(model, tmp_path / "perturbed.onnx")
    with pytest.raises(ParityError, match=r"output 'logits' top-1 agreement 0\.\d+ < 1") as info:
        package_artifact(tmp_path / "perturbed.onnx", lm, "onnx", "fp32", out, version=1)
    assert "max abs error" in str(info.value) and not out.exists()


@pytest.mark.slow
def test_cli_export_json_then_inspect_and_verify(
    digits_cnn_dir: Path, keys: dict, tmp_path: Path, capsys
) -> None:
    pkg = tmp_path / "cnn.pfpkg"
    code = pocketfleet.main(
        [
            "export",
            str(digits_cnn_dir),
            "--format",
            "onnx",
            "--out",
            str(pkg),
            "--name",
            "cnn",
            "--version",
            "7",
            "--json",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["name"] == "cnn" and report["version"] == 7 and report["key_id"] is None
    assert report["parity"]["passed"] and report["parity"]["outputs"][0]["agreement"] == 1.0
    assert report["metric"]["metric"] == "top1" and report["size_bytes"] > 0
    # unsigned: inspect works, verify refuses it
    assert pocketfleet.main(["inspect", str(pkg), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (
        info["signed"] is False and info["manifest"]["report"]["metric"]["value"] == report["metric"]["value"]
    )
    with pytest.raises(UnsignedPackageError):
        verify_package(pkg, keys["public_key"])
    assert pocketfleet.main(["sign", str(pkg), "--key", keys["private_key"]]) == 0
    assert pocketfleet.main(["verify", str(pkg), "--trust", keys["public_key"]]) == 0
    assert "OK" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- fast tests


def test_compare_outputs_reports_each_failing_number() -> None:
    ref = {"logits": np.array([[1.0, 0.0], [0.0, 1.0]]), "embedding": np.array([[1.0, 0.0], [0.0, 1.0]])}
    cand = {"logits": np.array([[1.0, 0.0], [1.0, 0.5]]), "embedding": np.array([[1.0, 0.1], [0.0, 1.0]])}
    report = compare_outputs(ref, cand, ParityBounds(max_abs=0.01, min_agreement=1.0, min_cosine=0.9999))
    assert not report.passed
    logits, emb = report.outputs
    assert (logits.kind, logits.agreement, logits.max_abs) == ("classifier", 0.5, 1.0)
    assert emb.kind == "embedding" and emb.min_cosine == pytest.approx(1 / np.sqrt(1.01))
    with pytest.raises(ParityError) as info:
        report.raise_for_failure("m.onnx")
    text = str(info.value)
    assert "m.onnx" in text and "'logits' top-1 agreement 0.5000 < 1" in text and "'embedding' cosine" in text
    assert "'logits' max abs error 1 >= 0.01" in text


def test_parity_bounds_defaults_per_dtype() -> None:
    assert ParityBounds.for_dtype("fp32") == ParityBounds(max_abs=1e-4, min_agreement=1.0, min_cosine=0.9999)
    assert ParityBounds.for_dtype("fp16") == ParityBounds(max_abs=None, min_agreement=0.995, min_cosine=0.999)


def test_onnx_fp16_weights_halve_size_and_keep_float_io(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export.onnx import weights_to_fp16

    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "fp32.onnx")
    assert weights_to_fp16(model) == 1
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, tmp_path / "fp16.onnx")
    assert (tmp_path / "fp16.onnx").stat().st_size < 0.55 * (tmp_path / "fp32.onnx").stat().st_size
    rt = load_runtime(tmp_path / "fp16.onnx")
    assert rt.inputs[0].dtype == "float32" and rt.outputs[0].dtype == "float32"
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(
        rt.run({"x": x})["y"], x @ w.astype(np.float16).astype(np.float32), rtol=1e-5, atol=1e-5
    )


def test_bad_format_or_dtype_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="format must be one of"):
        export_model(object(), "tensorrt", "fp32")
    with pytest.raises(ExportError, match="expected a torch.nn.Module.*load_model_dir"):
        export_model(tmp_path, "onnx", "fp32")
    with pytest.raises(ExportError, match="dtype must be one of"):
        export_model(object(), "onnx", "int3")


def test_import_export_stays_torch_free() -> None:
    code = (
        "import sys, export\n"
        "from export import verify_package, build_package, ParityBounds, check_parity, Manifest\n"
        "heavy = [m for m in ('torch', 'onnx', 'litert_torch', 'ai_edge_quantizer') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
