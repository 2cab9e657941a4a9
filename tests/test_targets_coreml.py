"""Core ML target for the iphone-15 profile: .mlpackage conversion, int8 / 4-bit palettized weights, a
deterministic zip inside a signed package, the checks a Linux host can make, parity recorded as not run."""

from __future__ import annotations

import platform
import zipfile
from pathlib import Path

import pytest

from compress.zoo import load_model_dir
from edge_agent.errors import HealthCheckError
from edge_agent.health import health_check
from export import ExportError, ExportResult, export_model, extract_package, generate_keys, verify_package
from export.coreml import NOT_RUN, inspect_mlpackage, zip_mlpackage
from export.runtimes import RuntimeLoadError, load_runtime

LINUX = platform.system() != "Darwin"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return generate_keys(tmp_path_factory.mktemp("coreml-keys"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, digits_mbnet_dir: Path, keys: dict):
    out = tmp_path_factory.mktemp("coreml")
    cache: dict[str, ExportResult] = {}

    def get(dtype: str) -> ExportResult:
        if dtype not in cache:
            cache[dtype] = export_model(
                load_model_dir(digits_mbnet_dir), "coreml", dtype, out=out / f"mbnet-{dtype}.pfpkg", version=1,
                key=keys["private_key"], device="iphone-15", model_out=out / f"mbnet-{dtype}.mlpackage.zip",
            )  # fmt: skip
        return cache[dtype]

    return get


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8", "pal4"])
def test_coreml_package_is_signed_checked_and_says_parity_was_not_run(exported, keys: dict, dtype: str) -> None:
    result = exported(dtype)
    manifest = verify_package(result.package, keys["public_key"])
    assert manifest.format == "coreml" and manifest.dtype == dtype and manifest.device == "iphone-15"
    assert manifest.model == "model.mlpackage.zip"
    report = manifest.report
    if LINUX:  # never a made-up number: parity and the Core ML metric are stated as not run
        assert report["parity"] == {"status": NOT_RUN, "passed": None, "reason": report["parity"]["reason"]}
        assert report["metric"] is None and report["metric_status"] == NOT_RUN
        assert result.parity.passed is False
    assert report["reference_metric"]["value"] > 0.9
    coreml = report["coreml"]
    assert coreml["checks"] and all(coreml["checks"].values())
    assert [s.name for s in manifest.inputs] == ["image"] and [s.name for s in manifest.outputs] == ["logits"]
    assert coreml["ops"]["conv"] > 0


def test_coreml_compression_shrinks_weights_as_expected(exported) -> None:
    ratio = {d: exported(d).manifest.report["coreml"]["compression_ratio"] for d in ("fp32", "fp16", "int8", "pal4")}
    assert ratio["fp32"] == pytest.approx(1.0, abs=0.01)
    assert 0.4 < ratio["fp16"] <= 0.55
    assert ratio["pal4"] < ratio["int8"] <= 0.35
    ops = {d: exported(d).manifest.report["coreml"]["ops"] for d in ("int8", "pal4")}
    assert "constexpr_affine_dequantize" in ops["int8"] or "constexpr_blockwise_shift_scale" in ops["int8"]
    assert "constexpr_lut_to_dense" in ops["pal4"]


def test_mlpackage_zip_is_deterministic_and_loads_as_a_spec(exported, tmp_path: Path) -> None:
    result = exported("int8")
    from export.coreml import unzip_mlpackage

    package = unzip_mlpackage(result.model_file, tmp_path / "a")
    first, second = zip_mlpackage(package, tmp_path / "1.zip"), zip_mlpackage(package, tmp_path / "2.zip")
    assert first.read_bytes() == second.read_bytes() == result.model_file.read_bytes()
    with zipfile.ZipFile(first) as zf:
        infos = zf.infolist()
    assert all(i.compress_type == zipfile.ZIP_STORED and i.date_time == (1980, 1, 1, 0, 0, 0) for i in infos)
    assert [i.filename for i in infos] == sorted(i.filename for i in infos)
    info = inspect_mlpackage(first)
    assert info["type"] == "mlProgram" and info["inputs"][0]["shape"] == [1, 1, 8, 8]


@pytest.mark.skipif(not LINUX, reason="on macOS the Core ML runtime loads the model")
def test_linux_agent_refuses_a_coreml_package_at_its_health_check(exported, keys: dict, tmp_path: Path) -> None:
    result = exported("fp16")
    manifest = verify_package(result.package, keys["public_key"])
    extract_package(result.package, tmp_path / "v1", keys["public_key"])
    with pytest.raises(RuntimeLoadError, match="run only on macOS"):
        load_runtime(tmp_path / "v1" / manifest.model)
    with pytest.raises(HealthCheckError, match="does not load"):
        health_check(tmp_path / "v1", manifest)


def test_coreml_rejects_a_bad_dtype_and_a_non_mlpackage(digits_cnn_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="dtype must be one of"):
        export_model(load_model_dir(digits_cnn_dir), "coreml", "int4")
    (tmp_path / "x.zip").write_bytes(b"PK junk")
    with pytest.raises(ExportError, match="not an .mlpackage directory"):
        zip_mlpackage(tmp_path / "missing.mlpackage", tmp_path / "y.zip")
