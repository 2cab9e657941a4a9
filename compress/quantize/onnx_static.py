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


def ranges_from_stats(
    stats: Mapping[str, TensorStats], method: str, percentile: float, keep_full: Iterable[str] = ()
) -> dict[str, tuple[float, float]]:
    """Ranges by `method`; tensors in `keep_full` (graph inputs and outputs) keep their min-max range: a
    clipped input loses information no later layer can recover, and clipped logits merge the top classes."""
    full = set(keep_full)
    return {name: compute_range(s, "minmax" if name in full else method, percentile) for name, s in stats.items()}


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
) -> Path:
    """Write the QDQ model: every quantizable node except those of `float_layers` (layer names); with
    `only_layers`, just those layers' compute nodes (used by the sensitivity analysis)."""
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
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=OP_TYPES,
                per_channel=per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=exclude,
                nodes_to_quantize=include,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )
    return out_path


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
