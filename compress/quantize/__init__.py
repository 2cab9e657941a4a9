"""Quantization: static PTQ (per-channel int8 weights, int8 activations, four calibration methods),
dynamic int8, fp16, QAT, per-layer sensitivity and accuracy-aware mixed precision, producing ONNX
(QDQ / dynamic) and TFLite (full-integer / dynamic-range) artifacts with packages. See
docs/quantization.md.

`compress.quantize(model, QuantConfig(...), calib_data)` calls `compress.quantize.quantize`: the package
is callable, so the name works both as the package and as the function.
"""

from export.latency import measure_latency
from pocketfleet import callable_package

from .api import QuantArtifact, QuantResult, fold_model, quantization_sensitivity, quantize
from .calibrate import TensorStats, compute_range
from .config import METHODS, MODES, QuantConfig
from .data import check_calib_data
from .errors import CalibrationDataError, QuantizeError, UnsupportedOpError
from .fold import fold_batchnorm
from .sensitivity import FloatChoice, SensitivityTable, choose_float_layers, layer_sensitivity

__all__ = [
    "METHODS",
    "MODES",
    "CalibrationDataError",
    "FloatChoice",
    "QuantArtifact",
    "QuantConfig",
    "QuantResult",
    "QuantizeError",
    "SensitivityTable",
    "TensorStats",
    "UnsupportedOpError",
    "check_calib_data",
    "choose_float_layers",
    "compute_range",
    "fold_batchnorm",
    "fold_model",
    "layer_sensitivity",
    "measure_latency",
    "quantization_sensitivity",
    "quantize",
]


callable_package(__name__, quantize)
