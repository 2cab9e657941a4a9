"""Shared helpers for the tests/test_fl_*.py files: digits data and a real ONNX features+logits model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compress.zoo.digits_data import digits_split


def digits_flat(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Digits pixels flattened to [n, 64] float32 and labels."""
    x, y = digits_split(split)
    return x.reshape(len(x), -1), y


def backbone_weights(seed: int = 0, hidden: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((64, hidden)) / 8).astype(np.float32), np.zeros(hidden, np.float32)


def onnx_backbone(path: Path, head_w: np.ndarray, head_b: np.ndarray, seed: int = 0) -> Path:
    """image [batch,1,8,8] -> features = relu(flat @ W1 + b1) [batch,32], logits = features @ Wh.T + bh."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1, b1 = backbone_weights(seed, head_w.shape[1])
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["image"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W1"], ["h"]),
            helper.make_node("Add", ["h", "B1"], ["hb"]),
            helper.make_node("Relu", ["hb"], ["features"]),
            helper.make_node("Gemm", ["features", "WH", "BH"], ["logits"], transB=1),
        ],
        "backbone",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", head_w.shape[1]]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", head_w.shape[0]]),
        ],
        initializer=[
            numpy_helper.from_array(w1, "W1"),
            numpy_helper.from_array(b1, "B1"),
            numpy_helper.from_array(head_w, "WH"),
            numpy_helper.from_array(head_b, "BH"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def head_package(tmp_path: Path) -> tuple[Path, Path, dict]:
    """A real signed .pfpkg with a features+logits ONNX model and a trainable head: (pkg, extracted, keys)."""
    from safetensors.numpy import save_file

    from edge_agent.training import DenseLayer, Head
    from export.package import build_package
    from export.signing import generate_keys
    from export.verify import extract_package

    head = Head([DenseLayer("head.weight", "head.bias")], features="features", weights_file="head.safetensors")
    w = head.init([32, 10], seed=5)
    model = onnx_backbone(tmp_path / "model.onnx", w["head.weight"], w["head.bias"])
    save_file(w, str(tmp_path / "head.safetensors"))
    keys = generate_keys(tmp_path / "keys")
    build_package(
        {"model.onnx": model, "head.safetensors": tmp_path / "head.safetensors"},
        {
            "name": "digits-head", "version": 1, "format": "onnx", "dtype": "float32", "model": "model.onnx",
            "inputs": [{"name": "image", "shape": ["batch", 1, 8, 8], "dtype": "float32"}],
            "outputs": [{"name": "features", "shape": ["batch", 32], "dtype": "float32"},
                        {"name": "logits", "shape": ["batch", 10], "dtype": "float32"}],
            "trainable_head": head.to_manifest(),
        },
        None, tmp_path / "m.pfpkg", key=keys["private_key"],
    )
    extract_package(tmp_path / "m.pfpkg", tmp_path / "pkg", trust=keys["public_key"])
    return tmp_path / "m.pfpkg", tmp_path / "pkg", keys
