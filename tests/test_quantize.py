"""compress.quantize on digits-cnn: every mode end to end in onnxruntime / LiteRT, every calibration
method, the sensitivity table, the accuracy-aware fallback, and every bad-input path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from compress.quantize import (
    CalibrationDataError,
    QuantConfig,
    QuantizeError,
    SensitivityTable,
    TensorStats,
    UnsupportedOpError,
    choose_float_layers,
    compute_range,
    quantization_sensitivity,
    quantize,
)

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def cnn(digits_cnn_dir: Path):
    from compress.zoo import load_model_dir

    return load_model_dir(digits_cnn_dir)


def _fp32_top1(lm) -> float:
    return lm.evaluate(batch_size=64)["value"]


# ------------------------------------------------------------------------------------------ config


def test_config_from_dict_names_unknown_and_bad_fields():
    assert QuantConfig.from_dict({"mode": "dynamic", "formats": "onnx"}).formats == ["onnx"]
    with pytest.raises(QuantizeError, match="unknown field.*'calib'"):
        QuantConfig.from_dict({"calib": "mse"})
    with pytest.raises(QuantizeError, match="calibration must be one of"):
        QuantConfig.from_dict({"calibration": "kl"})
    with pytest.raises(QuantizeError, match="formats"):
        QuantConfig.from_dict({"formats": ["coreml"]})
    with pytest.raises(QuantizeError, match="max_drop"):
        QuantConfig.from_dict({"max_drop": -0.1})


# ------------------------------------------------------------------------------------------ calibration


def _stats(x: np.ndarray) -> TensorStats:
    s = TensorStats()
    s.update_minmax(x)
    s.update_hist(x)
    return s


def test_calibration_methods_on_heavy_tailed_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000).astype(np.float32)
    x[:20] = 40.0  # rare outliers
    s = _stats(x)
    lo, hi = compute_range(s, "minmax")
    assert (lo, hi) == (float(x.min()), 40.0)
    for method in ("percentile", "entropy"):
        mlo, mhi = compute_range(s, method, percentile=99.99)
        assert mlo <= 0.0 <= mhi, method
        assert 3.0 < mhi < 20.0, (method, mhi)  # clips the outliers, keeps the bulk
    # mse: the range with the least expected quantization error on the histogram (of all four)
    from compress.quantize.calibrate import _centers, quant_mse

    def err(r):
        return quant_mse(_centers(s), s.hist.astype(float), np.array([r[0]]), np.array([r[1]]))[0]

    best = err(compute_range(s, "mse"))
    assert all(best <= err(compute_range(s, m)) * 1.0001 for m in ("minmax", "percentile", "entropy"))
    light = _stats(np.concatenate([x[20:], np.full(2, 12.0, np.float32)]))  # two mild outliers: clipped
    assert compute_range(light, "mse")[1] < 12.0
    relu = np.maximum(x, 0)
    rlo, rhi = compute_range(_stats(relu), "entropy")
    assert rlo == 0.0 and rhi > 2.0  # the spike of zeros does not collapse the range


def test_degenerate_tensor_gets_a_valid_range():
    lo, hi = compute_range(_stats(np.zeros(100, np.float32)), "mse")
    assert lo == 0.0 and hi > lo


@pytest.fixture(scope="module")
def cnn_onnx_stats(cnn, tmp_path_factory):
    from compress.quantize.onnx_static import calibrate_onnx
    from export.pipeline import convert

    fp32 = convert(cnn, "onnx", "fp32", tmp_path_factory.mktemp("calib") / "fp32.onnx")
    return fp32, calibrate_onnx(fp32, cnn.workload.calib_inputs(128))


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_each_calibration_method_runs_int8_in_onnxruntime(cnn, cnn_onnx_stats, tmp_path, method):
    from compress.quantize.onnx_graph import analyze_runtime
    from compress.quantize.onnx_static import io_names, quantize_onnx_static, ranges_from_stats
    from export.runtimes import load_runtime

    fp32, stats = cnn_onnx_stats
    ranges = ranges_from_stats(stats, method, 99.99, io_names(fp32))
    path = quantize_onnx_static(fp32, tmp_path / f"{method}.onnx", ranges, reduce_range=True)
    ops = analyze_runtime(path)["ops"]
    assert ops.get("QLinearConv") == 4 and "Conv" not in ops  # fused into int8 kernels
    top1 = cnn.evaluate(predict=load_runtime(path).run)["value"]
    assert top1 >= _fp32_top1(cnn) - 0.01, method


# ------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"image": np.zeros((4, 1, 7, 8), np.float32)}, r"'image' has shape \[4, 1, 7, 8\].*dimension 2"),
        ({"image": np.zeros((0, 1, 8, 8), np.float32)}, "empty"),
        ([], "empty"),
        ({"pixels": np.zeros((4, 1, 8, 8), np.float32)}, "unknown input 'pixels'"),
        ({"image": np.zeros((4, 8, 8), np.float32)}, "expected 4 dimensions"),
    ],
)
def test_bad_calibration_data_is_rejected_before_any_work(cnn, tmp_path, data, pattern):
    with pytest.raises(CalibrationDataError, match=pattern):
        quantize(cnn, QuantConfig(formats=["onnx"]), data, out_dir=tmp_path)
    assert not any(tmp_path.glob("*.onnx"))


def test_nan_in_calibration_data_names_the_row(cnn, tmp_path):
    images = cnn.workload.calib_inputs(16)["image"].copy()
    images[5, 0, 3, 3] = np.nan
    with pytest.raises(CalibrationDataError, match=r"'image' holds 1 NaN/inf value\(s\), first in row 5"):
        quantize(cnn, QuantConfig(formats=["onnx"]), {"image": images}, out_dir=tmp_path)


def test_unknown_float_layer_is_named(cnn, tmp_path):
    with pytest.raises(QuantizeError, match="'features.99' matches no quantizable layer"):
        quantize(cnn, QuantConfig(formats=["onnx"], float_layers=["features.99"], calib_samples=16),
                 out_dir=tmp_path, latency_runs=0)  # fmt: skip


class _Sin(torch.nn.Module):
    def forward(self, x):
        return torch.sin(x)


class _WithSin(torch.nn.Module):
    """digits-cnn with an op onnxruntime has no int8 kernel for (Sin) in front of it."""

    def __init__(self, inner):
        super().__init__()
        self.extra = _Sin()
        self.inner = inner

    def forward(self, image):
        return self.inner(self.extra(image))


def test_op_that_cannot_be_quantized_is_named_or_falls_back(cnn, tmp_path):
    odd = dataclasses.replace(cnn, module=_WithSin(cnn.module).eval())
    cfg = QuantConfig(formats=["onnx"], calib_samples=64, fallback="error", parity_min_agreement=0.0)
    with pytest.raises(UnsupportedOpError, match="op Sin in layer 'extra'"):
        quantize(odd, cfg, out_dir=tmp_path / "strict", latency_runs=0)
    result = quantize(
        odd, dataclasses.replace(cfg, fallback="float"), out_dir=tmp_path / "ok", latency_runs=0
    )
    art = result.artifacts[0]
    assert "extra" in art.float_layers
    assert art.details["ops"].get("QLinearConv") == 4  # the rest still runs in int8


# ------------------------------------------------------------------------------------------ end to end


def test_static_int8_onnx_and_full_integer_tflite(cnn, tmp_path):
    from export import read_manifest
    from export.runtimes import load_runtime

    result = quantize(cnn, QuantConfig(mode="static", calibration="mse", calib_samples=128), out_dir=tmp_path,
                      latency_runs=5)  # fmt: skip
    base = result.baseline
    assert {a.format for a in result.artifacts} == {"onnx", "tflite"}
    for art in result.artifacts:
        assert art.dtype == "int8" and art.float_layers == [] and art.parity["passed"]
        assert art.metric["value"] >= base["metric"]["value"] - 0.005
        assert art.size_bytes <= 0.31 * base["formats"][art.format]["size_bytes"]
        assert art.latency_ms["p50"] > 0 and art.latency_ms["p90"] >= art.latency_ms["p50"]
        manifest = read_manifest(art.package)
        assert manifest.dtype == "int8" and manifest.report["float_layers"] == []
        assert manifest.report["latency_ms"]["p50"] == art.latency_ms["p50"]
    tfl = next(a for a in result.artifacts if a.format == "tflite")
    manifest = read_manifest(tfl.package)
    (inp,), (out,) = manifest.inputs, manifest.outputs
    assert inp.dtype == "int8" and inp.quantization is not None and inp.quantization.scale > 0
    assert out.dtype == "int8" and out.quantization is not None
    rt = load_runtime(tfl.path)
    assert rt.inputs[0].quantization == inp.quantization
    # a device quantizes its float input with the manifest's scale / zero-point and gets the same answer
    x = cnn.workload.sample_inputs(1)["image"]
    q = np.clip(np.round(x / inp.quantization.scale) + inp.quantization.zero_point, -128, 127).astype(np.int8)
    assert np.allclose(rt.run({"image": q})["logits"], rt.run({"image": x})["logits"])
    assert set(tfl.details["ops"]) >= {"CONV_2D", "FULLY_CONNECTED"} and tfl.details["float_ops"] == []


def test_static_onnx_in_qoperator_form_writes_qlinear_ops_and_holds_parity(cnn, tmp_path):
    import onnx

    qdq, qop = (quantize(cnn, QuantConfig(mode="static", formats=["onnx"], calib_samples=64, quant_format=f),
                         out_dir=tmp_path / f, latency_runs=0).artifacts[0] for f in ("qdq", "qoperator"))  # fmt: skip
    ops = {f: {n.op_type for n in onnx.load(str(a.path)).graph.node} for f, a in (("qdq", qdq), ("qop", qop))}
    assert "QLinearConv" in ops["qop"] and "Conv" not in ops["qop"]  # the int8 ops are in the file
    assert "QLinearConv" not in ops["qdq"] and {"Conv", "DequantizeLinear"} <= ops["qdq"]
    assert qop.parity["passed"] and qop.metric["value"] >= qdq.metric["value"] - 0.01
    with pytest.raises(QuantizeError, match=r"quant_format must be one of \['qdq', 'qoperator'\]"):
        QuantConfig(quant_format="qlinear").validate()


def test_dynamic_int8_onnx_and_dynamic_range_tflite(cnn, tmp_path):
    result = quantize(cnn, QuantConfig(mode="dynamic"), out_dir=tmp_path, latency_runs=3)
    for art in result.artifacts:
        assert art.mode == "dynamic" and art.float_layers == []
        assert art.metric["value"] >= result.baseline["metric"]["value"] - 0.01
        assert art.size_bytes <= 0.31 * result.baseline["formats"][art.format]["size_bytes"]
    onnx_art = next(a for a in result.artifacts if a.format == "onnx")
    assert (
        onnx_art.details["ops"].get("ConvInteger") == 4
        and onnx_art.details["ops"].get("MatMulIntegerToFloat") == 1  # per-token activations (the default)
    )


def test_fp16_weights(cnn, tmp_path):
    result = quantize(cnn, QuantConfig(mode="fp16", formats=["onnx"]), out_dir=tmp_path, latency_runs=3)
    (art,) = result.artifacts
    assert art.dtype == "fp16" and art.parity["passed"]
    assert art.size_bytes < 0.55 * result.baseline["formats"]["onnx"]["size_bytes"]
    assert abs(art.metric["value"] - result.baseline["metric"]["value"]) <= 0.003


def test_qat_fine_tunes_then_converts(cnn, tmp_path):
    cfg = QuantConfig(mode="qat", formats=["onnx"], qat_epochs=1, calib_samples=128)
    result = quantize(cnn, cfg, out_dir=tmp_path, latency_runs=0)
    (art,) = result.artifacts
    qat = result.details["qat"]
    assert len(qat["val"]) == 2 and qat["best_val"] >= qat["val"][0]
    assert art.mode == "qat" and art.dtype == "int8"
    assert art.details["ops"].get("QLinearConv") == 4
    assert art.metric["value"] >= result.baseline["metric"]["value"] - 0.01


def test_folding_keeps_the_function(cnn):
    from compress.quantize import fold_batchnorm

    folded, names = fold_batchnorm(cnn.module)
    assert len(names) == 4 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.from_numpy(cnn.workload.sample_inputs(8)["image"])
    with torch.no_grad():
        assert torch.allclose(folded(x), cnn.module(x), atol=1e-4)


# ------------------------------------------------------------------------------------------ sensitivity


def test_sensitivity_table_has_every_layer(cnn):
    table = quantization_sensitivity(cnn, QuantConfig(calib_samples=64, sensitivity_samples=120))
    assert sorted(r["layer"] for r in table.rows) == [
        "classifier",
        "features.0",
        "features.10",
        "features.3",
        "features.7",
    ]
    assert table.samples == 120 and table.baseline > 0.9
    assert all(abs(r["drop"]) < 0.05 for r in table.rows)
    assert table.ranked()[0] == max(table.rows, key=lambda r: r["drop"])["layer"]


def test_choose_float_layers_is_greedy_then_gives_layers_back(tmp_path):
    # synthetic costs: the metric loses cost[layer] for each quantized layer; budget 0.05
    cost = {"a": 0.04, "b": 0.03, "c": 0.02, "d": 0.0}
    table = SensitivityTable("acc", True, 1.0, 1.0 - sum(cost.values()), "val", 10)
    table.rows = [{"layer": k, "metric": 1.0 - v, "drop": v} for k, v in cost.items()]

    def build(float_layers=(), only_layers=None):
        quantized = set(cost) - set(float_layers) if only_layers is None else set(only_layers)
        path = tmp_path / ("-".join(sorted(quantized)) or "none")
        path.write_text(str(1.0 - sum(cost[x] for x in quantized)))
        return path

    choice = choose_float_layers(table, 0.05, build, lambda p: float(p.read_text()))
    assert choice.met and choice.float_layers == ["a"]  # a and b were taken, b given back
    none = choose_float_layers(table, 0.0, build, lambda p: float(p.read_text()))
    assert none.met and sorted(none.float_layers) == ["a", "b", "c"]


def test_accuracy_aware_mode_keeps_sensitive_layers_in_float(cnn, tmp_path):
    # calibration on dimmed images (x0.15) makes the int8 ranges far too small: the all-int8 model is
    # much worse, and the max_drop search has to keep layers in float to get back within 1 pt
    calib = {"image": cnn.workload.calib_inputs(64)["image"] * 0.15}
    cfg = QuantConfig(formats=["onnx"], calibration="minmax", max_drop=0.01, sensitivity_samples=180,
                      parity_min_agreement=0.0)  # fmt: skip
    result = quantize(cnn, cfg, calib, out_dir=tmp_path, latency_runs=0)
    table = result.sensitivity["onnx"]
    (art,) = result.artifacts
    search = art.details["max_drop"]
    assert table.drop(table.all_int8) > 0.01  # the budget is not met with every layer in int8
    assert search["met"] and 0 < len(art.float_layers) < len(table.rows)
    assert search["metric"] >= table.baseline - 0.01
    assert set(art.float_layers) <= {r["layer"] for r in table.rows} | {"extra"}
