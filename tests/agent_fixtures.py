"""Shared helpers for the agent tests: real ONNX/LiteRT models built in milliseconds, signed packages of
several versions (built once per session), and a torch-free subprocess prelude.

The ONNX model is a digits-shaped conv net (image [batch, 1, 8, 8] -> logits [batch, 10]); each version
has different weights, so an answer's outputs prove which version produced it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export import Samples, build_package, generate_keys
from export.specs import TensorSpec

ROOT = Path(__file__).resolve().parents[1]
NAME = "digits"
X = np.random.default_rng(7).random((3, 1, 8, 8), dtype=np.float32)



def conv_net(path: Path, seed: int) -> Path:
    """Conv(1->4, 3x3, pad 1) -> Relu -> Flatten -> Gemm(256 -> 10), weights from `seed`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "cw"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "cb"),
        numpy_helper.from_array((rng.standard_normal((256, 10)) / 16).astype(np.float32), "fw"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "fb"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Flatten", ["r"], ["f"]),
            helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"]),
        ],
        "digits_conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


FIELDS = {
    "format": "onnx",
    "dtype": "fp32",
    "inputs": [TensorSpec("image", ("batch", 1, 8, 8), "float32")],
    "outputs": [TensorSpec("logits", ("batch", 10), "float32")],
}


@dataclass
class Packages:
    """Signed packages of `NAME`: `versions[v]` (good), `expected[v]` = logits of X under version v."""

    dir: Path
    public_key: str
    private_key: str
    versions: dict[int, Path]
    expected: dict[int, np.ndarray]
    unhealthy: Path  # version 50: signed and intact, but its samples do not match the model
    other_key: Path  # version 60, signed by an untrusted key
    tflite_int8: Path  # "requant" v1: LiteRT, int8 input/output with scale/zero-point


def build_packages(base: Path) -> Packages:
    from export.runtimes import load_runtime
    from tests.test_runtimes import _tflite_int8_requantize

    keys = generate_keys(base / "keys")
    other = generate_keys(base / "other-keys")
    versions, expected = {}, {}
    for v in range(1, 6):
        model = conv_net(base / f"m{v}.onnx", seed=v)
        rt = load_runtime(model)
        expected[v] = rt.run({"image": X})["logits"]
        versions[v] = base / f"{NAME}-v{v}.pfpkg"
        build_package(model, {**FIELDS, "name": NAME, "version": v}, Samples({"image": X}, {"logits": expected[v]}), versions[v], key=keys["private_key"])
    unhealthy = base / f"{NAME}-v50-unhealthy.pfpkg"
    wrong = expected[1] + 1.0  # the samples promise other outputs than the model gives
    build_package(base / "m1.onnx", {**FIELDS, "name": NAME, "version": 50}, Samples({"image": X}, {"logits": wrong}), unhealthy, key=keys["private_key"])
    other_key = base / f"{NAME}-v60-other-key.pfpkg"
    build_package(base / "m1.onnx", {**FIELDS, "name": NAME, "version": 60}, Samples({"image": X}, {"logits": expected[1]}), other_key, key=other["private_key"])
    tfl = _tflite_int8_requantize(base / "requant.tflite")
    rt = load_runtime(tfl)
    xs = np.linspace(-1, 1, 4, dtype=np.float32).reshape(1, 4)
    tflite_int8 = base / "requant-v1.pfpkg"
    build_package(
        tfl,
        {"name": "requant", "version": 1, "format": "tflite", "dtype": "int8", "inputs": rt.inputs, "outputs": rt.outputs},
        Samples({"x": xs}, rt.run({"x": xs})),
        tflite_int8,
        key=keys["private_key"],
    )
    return Packages(base, keys["public_key"], keys["private_key"], versions, expected, unhealthy, other_key, tflite_int8)


_BUILT: dict[str, Packages] = {}


def session_packages(factory: pytest.TempPathFactory) -> Packages:
    """The packages, built once per test session (each module's `packages` fixture calls this)."""
    if "packages" not in _BUILT:
        _BUILT["packages"] = build_packages(factory.mktemp("agent-packages"))
    return _BUILT["packages"]


def cli(*args: str, env: dict[str, str] | None = None, prelude: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `pocketfleet ARGS` in a fresh interpreter (optionally behind a prelude, e.g. NO_TORCH)."""
    code = prelude + "\nimport sys\nfrom pocketfleet.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, **(env or {})}, timeout=timeout,
    )


def spawn(*args: str, env: dict[str, str] | None = None, prelude: str = "", **kw: Any) -> subprocess.Popen:
    code = prelude + "\nimport sys\nfrom pocketfleet.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=ROOT, env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
    )
