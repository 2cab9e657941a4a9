"""export.runtimes: real onnxruntime and LiteRT runs on tiny models built here."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from export.runtimes import InputError, RuntimeLoadError, load_runtime
from export.specs import Quantization, TensorSpec
from pocketfleet import PocketfleetError

RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 3)).astype(np.float32)
B = RNG.standard_normal(3).astype(np.float32)


def _onnx_linear(path: Path) -> Path:
    """y = x @ W + B with a dynamic batch, plus an int32 input `ids` summed into `total`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "B"], ["y"]),
            helper.make_node("ReduceSum", ["ids"], ["total"], keepdims=0),
        ],
        "linear",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT32, ["batch", 2]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("total", TensorProto.INT32, []),
        ],
        initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _tflite_int8_requantize(path: Path) -> Path:
    """A one-op LiteRT model with int8 input/output: QUANTIZE (requantize) x -> y, shape [1, 4]."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as S

    def tensor(name: str, buffer: int, scale: float, zero_point: int) -> S.TensorT:
        t = S.TensorT()
        t.name, t.shape, t.type, t.buffer = name, [1, 4], S.TensorType.INT8, buffer
        t.quantization = S.QuantizationParametersT()
        t.quantization.scale, t.quantization.zeroPoint = [scale], [zero_point]
        return t

    code = S.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = S.BuiltinOperator.QUANTIZE
    code.version = 2
    op = S.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0], [1]
    sub = S.SubGraphT()
    sub.tensors = [tensor("x", 1, 0.1, -3), tensor("y", 2, 0.05, 2)]
    sub.inputs, sub.outputs, sub.operators = [0], [1], [op]
    model = S.ModelT()
    model.version, model.operatorCodes, model.subgraphs = 3, [code], [sub]
    model.buffers = [S.BufferT() for _ in range(3)]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())
    return path


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _onnx_linear(tmp_path_factory.mktemp("rt") / "linear.onnx")


@pytest.fixture(scope="module")
def tflite_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small conv net converted by litert-torch (fixed batch 1, names kept from PyTorch)."""
    import litert_torch
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4 * 64, 10)

        def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.fc(torch.relu(self.conv(image)).flatten(1))}

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rt") / "net.tflite"
    litert_torch.convert(Net().eval(), sample_kwargs={"image": torch.randn(1, 1, 8, 8)}).export(str(path))
    return path


def test_onnx_specs_keep_names_dynamic_dims_and_dtypes(onnx_path: Path) -> None:
    rt = load_runtime(onnx_path, threads=2)
    assert rt.format == "onnx" and rt.threads == 2
    assert rt.inputs == [TensorSpec("x", ("batch", 4), "float32"), TensorSpec("ids", ("batch", 2), "int32")]
    assert rt.outputs[0] == TensorSpec("y", ("batch", 3), "float32")


def test_onnx_run_matches_numpy(onnx_path: Path) -> None:
    rt = load_runtime(onnx_path)
    x = RNG.standard_normal((5, 4)).astype(np.float32)
    ids = np.arange(10, dtype=np.int64).reshape(5, 2)  # int64 ids fit int32: converted losslessly
    out = rt.run({"x": x, "ids": ids})
    np.testing.assert_allclose(out["y"], x @ W + B, rtol=1e-5, atol=1e-5)
    assert int(out["total"]) == 45


@pytest.mark.parametrize(
    ("inputs", "fragments"),
    [
        (
            {"x": np.zeros((2, 4), np.float32), "ids": np.zeros((2, 2), np.int32), "z": 0},
            ["unknown input 'z'"],
        ),
        ({"x": np.zeros((2, 4), np.float32)}, ["missing input 'ids'"]),
        (
            {"x": np.zeros((2, 5), np.float32), "ids": np.zeros((2, 2), np.int32)},
            ["input 'x'", "expected shape [batch, 4]", "got [2, 5]"],
        ),
        ({"x": np.zeros(4, np.float32), "ids": np.zeros((1, 2), np.int32)}, ["input 'x'", "2 dimensions"]),
        (
            {"x": np.zeros((2, 4), np.float64), "ids": np.zeros((2, 2), np.int32)},
            ["input 'x'", "expected dtype float32", "got float64"],
        ),
        (
            {"x": np.zeros((2, 4), np.float32), "ids": np.zeros((2, 2), np.float32)},
            ["input 'ids'", "expected dtype int32", "got float32"],
        ),
        (
            {"x": np.zeros((2, 4), np.float32), "ids": np.full((2, 2), 2**40, np.int64)},
            ["input 'ids'", "int32 range"],
        ),
        ({"x": np.zeros((2, 4), np.float32), "ids": np.zeros((3, 2), np.int32)}, ["batch size", "[2, 3]"]),
    ],
    ids=[
        "unknown-name",
        "missing",
        "wrong-dim",
        "wrong-rank",
        "wrong-dtype",
        "float-ids",
        "int-range",
        "batch",
    ],
)
def test_invalid_inputs_raise_input_error_naming_input_expected_and_got(
    onnx_path: Path, inputs: dict, fragments: list[str]
) -> None:
    rt = load_runtime(onnx_path)
    with pytest.raises(InputError) as info:
        rt.run(inputs)
    assert isinstance(info.value, PocketfleetError)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_load_errors_are_pocketfleet_errors(tmp_path: Path, onnx_path: Path) -> None:
    with pytest.raises(RuntimeLoadError, match="not found"):
        load_runtime(tmp_path / "absent.onnx")
    with pytest.raises(RuntimeLoadError, match="cannot tell the runtime"):
        load_runtime(onnx_path.with_suffix(".bin"))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(RuntimeLoadError, match="onnxruntime cannot load"):
        load_runtime(junk)
    junk_tfl = tmp_path / "junk.tflite"
    junk_tfl.write_bytes(b"not a model either")
    with pytest.raises(RuntimeLoadError, match="LiteRT cannot load"):
        load_runtime(junk_tfl)
    # the format argument overrides the suffix
    assert load_runtime(onnx_path, format="onnx").format == "onnx"


def test_litert_uses_pytorch_names_and_runs_larger_batches_in_chunks(tflite_path: Path) -> None:
    rt = load_runtime(tflite_path)
    assert rt.format == "tflite"
    assert rt.inputs == [TensorSpec("image", (1, 1, 8, 8), "float32")]
    assert rt.outputs == [TensorSpec("logits", (1, 10), "float32")]
    x = RNG.standard_normal((7, 1, 8, 8)).astype(np.float32)
    batched = rt.run({"image": x})["logits"]
    single = np.concatenate([rt.run({"image": x[i : i + 1]})["logits"] for i in range(7)])
    assert batched.shape == (7, 10)
    np.testing.assert_array_equal(batched, single)
    with pytest.raises(InputError, match=r"input 'image': expected shape \[1, 1, 8, 8\], got \[7, 1, 4, 8\]"):
        rt.run({"image": x[:, :, :4]})


def test_litert_runtime_is_safe_to_share_between_threads(tflite_path: Path) -> None:
    rt = load_runtime(tflite_path)
    xs = [RNG.standard_normal((3, 1, 8, 8)).astype(np.float32) for _ in range(8)]
    expected = [rt.run({"image": x})["logits"] for x in xs]
    results: list[np.ndarray | None] = [None] * len(xs)

    def work(i: int) -> None:
        for _ in range(20):
            results[i] = rt.run({"image": xs[i]})["logits"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_litert_int8_io_is_quantized_and_dequantized_for_the_caller(tmp_path: Path) -> None:
    rt = load_runtime(_tflite_int8_requantize(tmp_path / "q.tflite"))
    assert rt.inputs[0].dtype == "int8"
    assert rt.inputs[0].quantization == Quantization(pytest.approx(0.1), -3)
    assert rt.outputs[0].quantization == Quantization(pytest.approx(0.05), 2)
    x = np.array([[0.5, -1.2, 3.0, 0.04]], np.float32)
    y = rt.run({"x": x})["y"]
    assert y.dtype == np.float32
    # quantized with scale 0.1, requantized to 0.05: 0.04 rounds to 0.0 on the input grid
    np.testing.assert_allclose(y, [[0.5, -1.2, 3.0, 0.0]], atol=1e-6)
    # values beyond the int8 range saturate instead of wrapping around
    assert rt.run({"x": np.array([[100.0, -100.0, 0, 0]], np.float32)})["y"][0, 0] > 6.0
    # the storage dtype passes through unchanged
    raw = rt.run({"x": np.array([[2, -3, 7, -3]], np.int8)})["y"]
    np.testing.assert_allclose(raw, [[0.5, 0.0, 1.0, 0.0]], atol=1e-6)


def test_litert_codec_matches_the_reference_formula_on_every_grid_point() -> None:
    from export.runtimes import _Codec

    for dtype, zp in ((np.int8, -3), (np.uint8, 128)):
        codec = _Codec({"dtype": dtype, "quantization": (0.1, zp)})
        # halves (round to even) and both saturation ends
        x = np.concatenate([np.arange(-300, 300) * 0.05, [1e6, -1e6]]).astype(np.float32)
        info = np.iinfo(dtype)
        want = np.clip(np.round(x / np.float32(0.1)) + zp, info.min, info.max).astype(dtype)
        got = codec.quantize(x)
        assert got.dtype == dtype and np.array_equal(got, want)
        back = codec.dequantize(got)
        assert back.dtype == np.float32
        np.testing.assert_allclose(back, (want.astype(np.float32) - zp) * np.float32(0.1), rtol=1e-6)
