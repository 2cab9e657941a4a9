"""devices/: profiles, MAC / memory analysis on ONNX and TFLite, cost model, host probe and CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import devices
from devices.profile import FIGURE_FIELDS, ProfileError, load_profile_file, missing_sources
from pocketfleet import cli as pocketfleet

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- model builders


def _save(path: Path, nodes, inputs, outputs, inits=()) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _f32(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _init(name: str, shape) -> onnx.TensorProto:
    values = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return onnx.numpy_helper.from_array(values, name)


def _conv_model(path: Path, cin: int, cout: int, group: int, side: int, k: int, pad: int) -> Path:
    w = _init("w", [cout, cin // group, k, k])
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=group, pads=[pad] * 4, kernel_shape=[k, k])
    out = side + 2 * pad - k + 1
    return _save(
        path, [node], [_f32("x", ["batch", cin, side, side])], [_f32("y", ["batch", cout, out, out])], [w]
    )


# ---------------------------------------------------------------------------------------------- profiles


def test_every_bundled_profile_loads_and_every_figure_has_a_source():
    profiles = devices.list_profiles()
    names = {p.name for p in profiles}
    assert {"raspberry-pi-4", "jetson-nano", "pixel-7", "iphone-15", "cortex-m7", "x86-server"} <= names
    for p in profiles:
        assert missing_sources(p) == [], p.name
        for key in FIGURE_FIELDS:
            if key.startswith("cache_") and not getattr(p, key):
                continue  # optional; not modelled for this device
            assert len(p.sources.get(key, "").strip()) > 10, (p.name, key)
        assert p.preferred_format in p.runtimes
        assert p.throughput_gmacs["fp32"] > 0 and p.ram_bytes > 0 and p.storage_budget_bytes > 0
        assert all(f in p.op_overhead_us for f in p.runtimes)
    assert devices.load_profile("cortex-m7").weights_in_ram is False
    assert devices.load_profile("raspberry-pi-4").ram_bytes == 4 << 30


def _write_profile(tmp_path: Path, name: str, **changes) -> Path:
    text = (ROOT / "devices" / "profiles" / "raspberry-pi-4.toml").read_text()
    text = text.replace('name = "raspberry-pi-4"', f'name = "{name}"')
    for old, new in changes.items():
        text = text.replace(old, new)
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("cores = 4", "cores = 4\nfrequency_ghz = 1.5", "frequency_ghz"),
        ("cores = 4", 'cores = "four"', "cores"),
        ("int8_accelerated = false", "int8_accelerated = 0", "int8_accelerated"),
        ('runtimes = ["tflite", "onnx", "pte"]', 'runtimes = ["tflite", "tensorrt"]', "runtimes"),
        ("fp32 = 12.0", 'fp32 = "fast"', "throughput_gmacs.fp32"),
        ("\ntflite = 0.15\n", "\ntflite = 0.15\ntensorrt = 1.0\n", "op_overhead_us.tensorrt"),
        (
            'mem_bandwidth_gbs = "estimate',
            '# mem_bandwidth_gbs = "estimate',
            "mem_bandwidth_gbs",
        ),  # no source
        ('mem_bandwidth_gbs = "estimate', 'xmem = "estimate', "sources.xmem"),
        ("clock_ghz = 1.5\n", "", "clock_ghz"),  # missing field
        ("cache_bandwidth_gbs = 24.0\n", "", "cache_bandwidth_gbs"),  # cache size without its bandwidth
    ],
)
def test_bad_profile_error_names_the_field_and_file(tmp_path, old, new, field):
    path = _write_profile(tmp_path, "bad", **{old: new})
    with pytest.raises(ProfileError) as info:
        load_profile_file(path)
    message = str(info.value)
    assert field in message and "bad.toml" in message


def test_invalid_toml_and_unknown_device_are_clear_errors(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("name = [unterminated")
    with pytest.raises(ProfileError, match="broken.toml: not valid TOML"):
        load_profile_file(path)
    with pytest.raises(ProfileError, match="unknown device 'toaster'.*raspberry-pi-4.*host"):
        devices.load_profile("toaster")


def test_sizes_may_be_given_in_mebibytes(tmp_path):
    path = _write_profile(tmp_path, "mb", **{"ram_bytes = 4294967296": "ram_mb = 512"})
    assert load_profile_file(path).ram_bytes == 512 << 20
    assert load_profile_file(path).storage_budget_bytes == 1024 << 20


# ---------------------------------------------------------------------------------------------- ONNX analysis


def test_onnx_macs_are_exact_for_conv_grouped_depthwise_and_linear(tmp_path):
    conv = _conv_model(tmp_path / "conv.onnx", cin=3, cout=4, group=1, side=8, k=3, pad=1)
    assert devices.count_macs(conv) == 8 * 8 * 4 * (3 * 3 * 3)  # out elems x (cin/g * k*k)
    grouped = _conv_model(tmp_path / "grouped.onnx", cin=4, cout=6, group=2, side=6, k=3, pad=0)
    assert devices.count_macs(grouped) == 4 * 4 * 6 * (2 * 3 * 3)
    depthwise = _conv_model(tmp_path / "dw.onnx", cin=6, cout=6, group=6, side=5, k=3, pad=0)
    assert devices.count_macs(depthwise) == 3 * 3 * 6 * 9
    gemm = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
    linear = _save(
        tmp_path / "linear.onnx",
        [gemm],
        [_f32("x", ["batch", 32])],
        [_f32("y", ["batch", 10])],
        [_init("w", [10, 32]), _init("b", [10])],
    )
    a = devices.analyze_model(linear)
    assert a.macs == 320 and a.params_count == 330 and a.params_bytes == 330 * 4 and a.op_count == 1
    assert a.inputs == [{"name": "x", "shape": [1, 32], "dtype": "float32"}]  # batch fixed to 1


def test_onnx_sequence_dimension_follows_seq_len(tmp_path):
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    path = _save(
        tmp_path / "seq.onnx",
        [node],
        [_f32("x", ["batch", "sequence", 16])],
        [_f32("y", ["batch", "sequence", 8])],
        [_init("w", [16, 8])],
    )
    assert devices.count_macs(path, seq_len=128) == 128 * 16 * 8
    assert devices.count_macs(path, seq_len=7) == 7 * 16 * 8


def test_data_dependent_shapes_come_from_an_onnxruntime_run(tmp_path):
    nodes = [
        helper.make_node("NonZero", ["x"], ["nz"]),  # [2, count]: unknown to shape inference
        helper.make_node("Transpose", ["nz"], ["t"]),
        helper.make_node("Cast", ["t"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["f", "w"], ["y"]),
    ]
    path = _save(
        tmp_path / "nz.onnx",
        nodes,
        [_f32("x", ["batch", 4])],
        [_f32("y", ["count", 5])],
        [_init("w", [2, 5])],
    )
    a = devices.analyze_model(path)
    assert a.macs == 4 * 2 * 5  # all-ones input: every element non-zero (the largest case)
    assert any("onnxruntime run" in w for w in a.warnings)


def test_peak_activation_memory_follows_liveness_on_a_chain(tmp_path):
    # x -> Neg -> a -> Neg -> b ; Add(x, b) -> c ; Concat(c, c) -> d ; Relu(d) -> e.  [1,64] fp32 = 256 B.
    nodes = [
        helper.make_node("Neg", ["x"], ["a"]),
        helper.make_node("Neg", ["a"], ["b"]),
        helper.make_node("Add", ["x", "b"], ["c"]),
        helper.make_node("Concat", ["c", "c"], ["d"], axis=1),
        helper.make_node("Relu", ["d"], ["e"]),
    ]
    path = _save(tmp_path / "chain.onnx", nodes, [_f32("x", [1, 64])], [_f32("e", [1, 128])])
    a = devices.analyze_model(path)
    # live per step: {x,a}=512, {x,a,b}=768, {x,b,c}=768, {c,d}=768, {d,e}=1024 -> peak 1024
    assert a.peak_activation_bytes == 1024
    assert a.macs == 0 and a.elementwise == 64 + 64 + 64 + 128 and a.op_count == 5


def test_fused_activation_costs_nothing_and_is_not_materialized(tmp_path):
    w = _init("w", [8, 4, 1, 1])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[1, 1]),
        helper.make_node("Relu", ["y"], ["z"]),
    ]
    path = _save(tmp_path / "convrelu.onnx", nodes, [_f32("x", [1, 4, 4, 4])], [_f32("z", [1, 8, 4, 4])], [w])
    a = devices.analyze_model(path)
    assert [op.kind for op in a.ops] == ["compute", "fused"]
    assert a.op_count == 1 and a.macs == 16 * 8 * 4
    assert a.peak_activation_bytes == (64 + 128) * 4  # input + one output buffer, not two


def test_dynamic_int8_model_is_costed_as_int8(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    fp32 = _save(
        tmp_path / "mm.onnx", [node], [_f32("x", [1, 64])], [_f32("y", [1, 64])], [_init("w", [64, 64])]
    )
    q = tmp_path / "mm_int8.onnx"
    quantize_dynamic(str(fp32), str(q), weight_type=QuantType.QInt8)
    a = devices.analyze_model(q)
    assert a.macs == 64 * 64 and a.dtypes == {"int8": 64 * 64}
    assert a.params_bytes < devices.analyze_model(fp32).params_bytes / 3  # int8 weights


# ---------------------------------------------------------------------------------------------- TFLite analysis


@pytest.fixture(scope="module")
def tflite_model(tmp_path_factory) -> Path:
    """conv 3->6 (3x3, pad 1) on 8x8 -> depthwise 3x3 on 6 channels -> flatten -> linear 216->10, one
    litert-torch conversion for the whole module."""
    torch = pytest.importorskip("torch")
    litert_torch = pytest.importorskip("litert_torch")

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
            self.dw = torch.nn.Conv2d(6, 6, 3, groups=6)
            self.fc = torch.nn.Linear(216, 10)

        def forward(self, x):
            return self.fc(torch.flatten(self.dw(self.conv(x)), 1))

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tflite") / "tiny.tflite"
    litert_torch.convert(Tiny().eval(), (torch.randn(1, 3, 8, 8),)).export(str(path))
    return path


CONV_MACS, DW_MACS, FC_MACS = 8 * 8 * 6 * 27, 6 * 6 * 6 * 9, 216 * 10


def test_tflite_macs_are_exact_for_conv_depthwise_and_linear(tflite_model):
    a = devices.analyze_model(tflite_model)
    by_type = a.by_op_type()
    assert by_type["CONV_2D"]["macs"] == CONV_MACS
    assert by_type["DEPTHWISE_CONV_2D"]["macs"] == DW_MACS
    assert by_type["FULLY_CONNECTED"]["macs"] == FC_MACS
    assert a.macs == CONV_MACS + DW_MACS + FC_MACS
    weights = (6 * 27 + 6) + (6 * 9 + 6) + (216 * 10 + 10)
    assert weights <= a.params_count < weights + 16  # + a few int32 shape constants
    assert a.peak_activation_bytes >= (8 * 8 * 6 + 6 * 6 * 6) * 4  # conv output and depthwise output live


def test_tflite_and_onnx_of_the_same_model_agree(tflite_model, tmp_path):
    w = [_init("w1", [6, 3, 3, 3]), _init("b1", [6]), _init("w2", [6, 1, 3, 3]), _init("b2", [6])]
    w += [_init("w3", [10, 216]), _init("b3", [10])]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Conv", ["c1", "w2", "b2"], ["c2"], group=6, kernel_shape=[3, 3]),
        helper.make_node("Flatten", ["c2"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1),
    ]
    path = _save(
        tmp_path / "tiny.onnx", nodes, [_f32("x", ["batch", 3, 8, 8])], [_f32("y", ["batch", 10])], w
    )
    onnx_a, tflite_a = devices.analyze_model(path), devices.analyze_model(tflite_model)
    assert onnx_a.macs == tflite_a.macs == CONV_MACS + DW_MACS + FC_MACS
    assert onnx_a.params_count == (6 * 27 + 6) + (6 * 9 + 6) + (216 * 10 + 10)


# ---------------------------------------------------------------------------------------------- cost model


def test_cost_model_scales_with_device_and_checks_fits(tmp_path):
    path = _conv_model(tmp_path / "conv.onnx", cin=16, cout=32, group=1, side=32, k=3, pad=1)
    pi = devices.estimate(path, "raspberry-pi-4")
    server = devices.estimate(path, "x86-server")
    assert pi.measured_ms is None and pi.macs == 32 * 32 * 32 * 16 * 9
    assert pi.estimated_ms > server.estimated_ms > 0
    assert pi.fits and pi.storage_needed_bytes == path.stat().st_size
    mcu = devices.estimate(path, "cortex-m7")
    assert not mcu.format_supported and not mcu.fits and any("does not run onnx" in w for w in mcu.warnings)
    # RAM on the MCU excludes the weights (they stay in flash)
    assert mcu.ram_needed_bytes == 16384 + mcu.peak_activation_bytes


def test_cached_activations_and_weights_follow_the_last_level_cache(tmp_path):
    import dataclasses

    pi = devices.load_profile("raspberry-pi-4")
    # a depthwise conv moves more bytes per MAC than the Pi's DRAM keeps up with
    small = _conv_model(tmp_path / "small.onnx", cin=64, cout=64, group=64, side=16, k=3, pad=1)
    cached = devices.estimate(small, pi)
    uncached = devices.estimate(small, dataclasses.replace(pi, cache_bytes=0, cache_bandwidth_gbs=0.0))
    assert cached.memory_level == "cache" and uncached.memory_level == "dram"
    assert cached.estimated_ms < uncached.estimated_ms
    big = _conv_model(tmp_path / "big.onnx", cin=256, cout=512, group=1, side=4, k=3, pad=1)  # 4.7 MB weights
    assert devices.estimate(big, pi).memory_level == "mixed"  # small activations cached, weights streamed
    wide = _conv_model(tmp_path / "wide.onnx", cin=64, cout=64, group=64, side=128, k=3, pad=1)  # 8 MB acts
    assert devices.estimate(wide, pi).memory_level == "dram"


def test_estimate_reads_a_package(tmp_path):
    from export.package import build_package
    from export.specs import TensorSpec

    model = _conv_model(tmp_path / "model.onnx", cin=1, cout=8, group=1, side=8, k=3, pad=1)
    pkg = tmp_path / "tiny.pfpkg"
    build_package(
        {"model.onnx": model},
        {
            "name": "tiny",
            "version": 1,
            "format": "onnx",
            "dtype": "float32",
            "inputs": [TensorSpec("x", ("batch", 1, 8, 8), "float32")],
            "outputs": [TensorSpec("y", ("batch", 8, 8, 8), "float32")],
        },
        None,
        pkg,
    )
    e = devices.estimate(pkg, "pixel-7")
    assert e.package["name"] == "tiny" and e.format == "onnx"
    assert e.macs == devices.count_macs(model) == 8 * 8 * 8 * 9
    assert e.storage_needed_bytes == pkg.stat().st_size


# ---------------------------------------------------------------------------------------------- host probe


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("POCKETFLEET_CACHE", str(cache))
    yield devices.probe_host(), cache
    mp.undo()


def test_host_probe_measures_and_caches(host):
    profile, cache = host
    assert profile.name == "host" and profile.threads == 1
    assert profile.cores >= 1 and profile.ram_bytes > 1 << 26 and profile.storage_budget_bytes > 0
    assert profile.throughput_gmacs["fp32"] > 0.1 and profile.mem_bandwidth_gbs > 0.1
    assert set(profile.runtimes) == {"onnx", "tflite"}
    assert all(0 <= v < 1000 for v in profile.op_overhead_us.values())
    assert all(0 < v < 10_000 for v in profile.invoke_overhead_us.values())
    assert missing_sources(profile) == []
    doc = json.loads((cache / "host-probe.json").read_text())
    assert doc["schema"] == "pocketfleet.host-probe/1" and doc["timestamp"]
    again = devices.probe_host()  # from the cache: same measurement
    assert again.measured["timestamp"] == profile.measured["timestamp"]
    assert again.throughput_gmacs == profile.throughput_gmacs


def test_host_estimate_measures_and_is_within_a_sanity_bound(host, tmp_path, tflite_model):
    profile, _ = host
    path = _conv_model(tmp_path / "conv.onnx", cin=8, cout=16, group=1, side=16, k=3, pad=1)
    for model in (path, tflite_model):
        e = devices.estimate(model, profile, min_runs=50, min_seconds=0.3)
        assert e.measured_ms is not None and e.measured_threads == 1 and e.measured_runs >= 50
        assert 0.25 < e.ratio < 4.0, e.to_dict()
        assert 0 < e.measured_cpu_ms <= e.measured_ms * 1.5 and e.cpu_ratio > 0


# ---------------------------------------------------------------------------------------------- CLI


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = pocketfleet.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_outputs_parse(capsys, tmp_path):
    code, out, _ = _cli(capsys, "devices", "list", "--json")
    assert code == 0 and {r["name"] for r in json.loads(out)} >= {"raspberry-pi-4", "cortex-m7"}
    code, out, _ = _cli(capsys, "devices", "show", "jetson-nano", "--json")
    assert code == 0 and json.loads(out)["throughput_gmacs"]["fp16"] == 140.0
    model = _conv_model(tmp_path / "conv.onnx", cin=1, cout=8, group=1, side=8, k=3, pad=1)
    code, out, _ = _cli(
        capsys, "devices", "estimate", str(model), "--device", "raspberry-pi-4", "--json", "--ops"
    )
    doc = json.loads(out)
    assert code == 0 and doc["macs"] == 4608 and doc["device"] == "raspberry-pi-4" and len(doc["ops"]) == 1
    code, out, _ = _cli(capsys, "devices", "estimate", str(model), "--device", "pixel-7")
    assert code == 0 and "estimated latency" in out


def test_cli_unknown_device_lists_the_known_ones(capsys, tmp_path):
    model = _conv_model(tmp_path / "conv.onnx", cin=1, cout=8, group=1, side=8, k=3, pad=1)
    code, out, err = _cli(capsys, "devices", "estimate", str(model), "--device", "toaster")
    assert code == 2 and out == ""
    assert "unknown device 'toaster'" in err and "raspberry-pi-4" in err and "cortex-m7" in err
    code, _, err = _cli(capsys, "devices", "estimate", str(tmp_path / "missing.onnx"), "--device", "pixel-7")
    assert code == 2 and "not found" in err


def test_devices_import_and_analysis_need_no_torch(tmp_path, no_torch):
    model = _conv_model(tmp_path / "conv.onnx", cin=1, cout=8, group=1, side=8, k=3, pad=1)
    code = (
        "import sys, devices\n"
        "assert 'onnx' not in sys.modules, 'onnx imported eagerly'\n"
        f"print(devices.count_macs({str(model)!r}))\n"
        "print(devices.estimate(" + repr(str(model)) + ", 'raspberry-pi-4').estimated_ms > 0)\n"
    )
    proc = no_torch.python(code, allow=("onnx",))  # reading an ONNX graph needs onnx, not torch
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["4608", "True"]


def test_cpu_summary_names_the_int8_flags_this_cpu_reports() -> None:
    from devices.probe import INT8_FLAGS, cpu_summary

    s = cpu_summary()
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert s["model"] and s["cpus"] == os.cpu_count()
    assert s["int8_flags"] == [f for f in INT8_FLAGS if f in flags]
