"""Regenerate the tiny models in devices/probe_models/ that the host probe times (needs onnx, torch,
litert-torch; run once by a developer: `python -m devices._build_probe_models`). The files are shipped
so that a device with only onnxruntime / LiteRT installed can probe itself.

- chain<N>.onnx / chain<N>.tflite: inputs x, y [1, 16] float32; N ops alternating x + y and x * y
  (nothing to fold or fuse), output z. Timing N=1 against N=CHAIN gives the per-op dispatch cost.
- matmul_fp32.onnx: MatMul(a [M, K], b [K, N]); matmul_int8.onnx: MatMulInteger(a uint8, b int8).
  Dimensions are symbolic; `b` is a graph input that the probe pins as a constant with
  SessionOptions.add_initializer, so the model files stay tiny.
"""

from __future__ import annotations

from pathlib import Path

OUT = Path(__file__).parent / "probe_models"
CHAIN = 64
OPSET = 17


def _chain_onnx(n: int) -> bytes:
    from onnx import TensorProto, helper

    nodes, prev = [], "x"
    for i in range(n):
        out = "z" if i == n - 1 else f"t{i}"
        nodes.append(helper.make_node("Add" if i % 2 == 0 else "Mul", [prev, "y"], [out], name=f"op{i}"))
        prev = out
    graph = helper.make_graph(
        nodes,
        f"chain{n}",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 16]) for name in ("x", "y")],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 16])],
    )
    return _model(graph)


def _matmul_onnx(int8: bool) -> bytes:
    from onnx import TensorProto, helper

    a_type, b_type = (TensorProto.UINT8, TensorProto.INT8) if int8 else (TensorProto.FLOAT, TensorProto.FLOAT)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger" if int8 else "MatMul", ["a", "b"], ["c"], name="matmul")],
        "matmul_int8" if int8 else "matmul_fp32",
        [
            helper.make_tensor_value_info("a", a_type, ["m", "k"]),
            helper.make_tensor_value_info("b", b_type, ["k", "n"]),
        ],
        [helper.make_tensor_value_info("c", TensorProto.INT32 if int8 else TensorProto.FLOAT, ["m", "n"])],
    )
    return _model(graph)


def _model(graph: object) -> bytes:
    import onnx
    from onnx import helper

    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="pocketfleet"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _chain_tflite(n: int, path: Path) -> None:
    import litert_torch
    import torch

    class Chain(torch.nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            for i in range(n):
                x = x + y if i % 2 == 0 else x * y
            return x

    example = (torch.zeros(1, 16), torch.zeros(1, 16))
    litert_torch.convert(Chain().eval(), example).export(str(path))


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for n in (1, CHAIN):
        (OUT / f"chain{n}.onnx").write_bytes(_chain_onnx(n))
        _chain_tflite(n, OUT / f"chain{n}.tflite")
    (OUT / "matmul_fp32.onnx").write_bytes(_matmul_onnx(int8=False))
    (OUT / "matmul_int8.onnx").write_bytes(_matmul_onnx(int8=True))
    for p in sorted(OUT.iterdir()):
        print(p.name, p.stat().st_size)


if __name__ == "__main__":
    main()
