"""Static int8 ONNX in QDQ form: our calibration, onnxruntime's QDQ emitter.

Activation ranges come from `calibrate.compute_range` (minmax / percentile / entropy / mse over our
histograms) and are handed to `onnxruntime.quantization.quantize_static` as a calibration cache, so the
graph rewrite is onnxruntime's well-tested QDQ machinery while every range and every float-layer choice
is ours. Weights: int8 symmetric, per output channel. Activations: uint8 asymmetric (the u8s8 kernels
onnxruntime's CPU provider fuses QDQ Conv/Gemm/MatMul into).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .calibrate import TensorStats, compute_range
from .onnx_graph import collect_stats, compute_layers

# ops QDQ-quantized when present (onnxruntime's registry plus the element-wise ops it fuses)
OP_TYPES = [
    "Conv", "Gemm", "MatMul", "Add", "Mul", "Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool",
    "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Gather", "Sigmoid", "Softmax",
]  # fmt: skip


def int16_overflow_risk() -> bool:
    """True on x86 CPUs without VNNI: onnxruntime's u8s8 kernels there sum pairs of u8*s8 products in
    int16 (vpmaddubsw), which saturates with full-range int8 weights. 7-bit weights ("reduce range")
    avoid it; on VNNI x86 and on ARM the full 8 bits are safe."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return not any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def ranges_from_stats(
    stats: Mapping[str, TensorStats], method: str, percentile: float, keep_full: Iterable[str] = ()
) -> dict[str, tuple[float, float]]:
    """Ranges by `method`; tensors in `keep_full` (graph inputs and outputs) keep their min-max range: a
    clipped input loses information no later layer can recover, and clipped logits merge the top classes."""
    full = set(keep_full)
    return {
        name: compute_range(s, "minmax" if name in full else method, percentile) for name, s in stats.items()
    }


def io_names(path: str | Path) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    return [i.name for i in model.graph.input] + [o.name for o in model.graph.output]


def quantize_onnx_static(
    fp32_path: str | Path,
    out_path: str | Path,
    ranges: Mapping[str, tuple[float, float]],
    float_layers: Iterable[str] = (),
    only_layers: Iterable[str] | None = None,
    per_channel: bool = True,
    reduce_range: bool = False,
    quant_format: str = "qdq",
) -> Path:
    """Write the QDQ model: every quantizable node except those of `float_layers` (layer names); with
    `only_layers`, just those layers' compute nodes (used by the sensitivity analysis). `quant_format`
    "qoperator" writes QLinearConv/QLinearAdd/... nodes instead of QDQ pairs (measured alternatives:
    compress.quantize.speed_guard)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    model = onnx.load(str(fp32_path))
    layers = compute_layers(model)
    exclude = [n.name for layer in float_layers for n in layers.get(layer, [])]
    include = None
    if only_layers is not None:
        include = [n.name for layer in only_layers for n in layers.get(layer, [])]
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="pf-qdq-") as tmp:
        cache = Path(tmp) / "ranges.json"
        data = {
            name: TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
            for name, (lo, hi) in ranges.items()
        }
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
        with _quiet_ort():
            quantize_static(
                str(fp32_path),
                str(out_path),
                calibration_data_reader=None,
                calibration_cache_path=str(cache),
                quant_format=QuantFormat.QOperator if quant_format == "qoperator" else QuantFormat.QDQ,
                op_types_to_quantize=OP_TYPES,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=exclude,
                nodes_to_quantize=include,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )
    return out_path


def canonicalize(src: str | Path, dst: str | Path) -> Path:
    """Rewrite ops onnxruntime has no int8 kernel for into equivalents it has: a ReduceMean over the two
    spatial axes of a 4-D tensor with keepdims (what exporters emit for AdaptiveAvgPool2d(1)) becomes
    GlobalAveragePool (QLinearGlobalAveragePool in int8)."""
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    ranks = {
        vi.name: len(vi.type.tensor_type.shape.dim)
        for vi in onnx.shape_inference.infer_shapes(model).graph.value_info
    }
    ranks.update({i.name: len(i.type.tensor_type.shape.dim) for i in model.graph.input})
    for i, node in enumerate(model.graph.node):
        if node.op_type != "ReduceMean" or ranks.get(node.input[0]) != 4:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1] in inits:
            axes = inits[node.input[1]].tolist()
        if attrs.get("keepdims", 1) == 1 and axes is not None and sorted(a % 4 for a in axes) == [2, 3]:
            model.graph.node[i].CopyFrom(
                helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=node.name)
            )
    onnx.save(model, str(dst))
    return Path(dst)


def calibrate_onnx(
    fp32_path: str | Path, data: Mapping[str, np.ndarray], threads: int = 1, batch_size: int = 16
) -> dict[str, TensorStats]:
    """Statistics of every float activation of the model over the calibration data."""
    return collect_stats(fp32_path, data, batch_size=batch_size, threads=threads)


@contextmanager
def _quiet_ort() -> Any:
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
