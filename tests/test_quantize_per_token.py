"""Per-token dynamic int8 for linear layers: exact against a NumPy reference of the same arithmetic, and far
closer to fp32 than per-tensor when a few tokens carry outliers (as transformer activations do)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from compress.quantize.onnx_dynamic import quantize_onnx_dynamic


def linear_model(path: Path, w: np.ndarray, b: np.ndarray) -> Path:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"], name="fc"), helper.make_node("Add", ["xw", "b"], ["y"], name="fc_bias")],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "tokens", w.shape[1]])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_per_token_matches_its_reference_and_beats_per_tensor_on_outlier_tokens(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.1, (64, 32)).astype(np.float32)
    b = rng.normal(0, 0.1, 32).astype(np.float32)
    x = rng.normal(0, 1, (2, 16, 64)).astype(np.float32)
    x[:, 3] *= 60.0  # one outlier token per sequence
    fp32 = linear_model(tmp_path / "fp32.onnx", w, b)
    token, _ = quantize_onnx_dynamic(fp32, tmp_path / "token.onnx", per_token=True)
    tensor, _ = quantize_onnx_dynamic(fp32, tmp_path / "tensor.onnx", per_token=False)
    ops = {n.op_type for n in onnx.load(str(token)).graph.node}
    assert "MatMulIntegerToFloat" in ops and "DynamicQuantizeMatMul" not in ops

    # reference of the same arithmetic: symmetric per-row activations, per-column symmetric weights
    x_scale = np.maximum(np.abs(x).max(-1, keepdims=True), 1e-8) / 127
    x_q = np.round(x / x_scale)
    w_scale = np.abs(w).max(0) / 63  # 7-bit weights: exact in x86 u8s8 kernels
    w_q = np.clip(np.round(w / w_scale), -63, 63)
    want = (x_q @ w_q) * x_scale * w_scale + b
    got = run(token, x)
    assert np.allclose(got, want, rtol=1e-4, atol=1e-4)

    exact = x @ w + b
    normal = np.ones(16, bool)
    normal[3] = False
    err_token = np.abs(got - exact)[:, normal].mean()
    err_tensor = np.abs(run(tensor, x) - exact)[:, normal].mean()
    assert err_token < 0.2 * err_tensor  # the outlier token no longer sets everyone's scale
