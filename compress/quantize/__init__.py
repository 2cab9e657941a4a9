"""Quantization: static PTQ (per-channel int8 weights, int8 activations, four calibration methods),
dynamic int8, fp16, QAT, per-layer sensitivity and accuracy-aware mixed precision, producing ONNX
(QDQ / dynamic) and TFLite (full-integer / dynamic-range) artifacts with packages. See
docs/quantization.md.

`compress.quantize(model, QuantConfig(...), calib_data)` calls `compress.quantize.quantize` (model: an
nn.Module, an .onnx file or a reference workload). Layers: `core.quantize_files` turns fp32 model files into
quantized files and knows nothing of packages; `api.quantize` is the one-call convenience that exports the
fp32 files, calls the core and packages/signs every artifact through `export`.

The package is callable (pocketfleet.callable_package) so that the name works both as the package and as
the function: Python binds an imported submodule onto its parent package (`import compress.quantize.config`
sets `compress.quantize` to the package), so a plain function of that name in `compress` could not coexist
with the package.
"""

from export.latency import measure_latency
from pocketfleet import callable_package

from .api import QuantArtifact, QuantResult, fold_model, quantization_sensitivity, quantize
from .calibrate import TensorStats, compute_range
from .config import METHODS, MODES, QuantConfig
from .core import QuantizedFile, quantize_files
from .data import check_calib_data, collect_eval, collect_rows
from .errors import CalibrationDataError, QuantizeError, UnsupportedOpError
from .fold import fold_batchnorm
from .sensitivity import FloatChoice, SensitivityTable, choose_float_layers, layer_sensitivity
from .source import QuantModel

__all__ = [
    "METHODS",
    "MODES",
    "CalibrationDataError",
    "FloatChoice",
    "QuantArtifact",
    "QuantConfig",
    "QuantModel",
    "QuantResult",
    "QuantizedFile",
    "QuantizeError",
    "SensitivityTable",
    "TensorStats",
    "UnsupportedOpError",
    "check_calib_data",
    "collect_eval",
    "collect_rows",
    "choose_float_layers",
    "compute_range",
    "fold_batchnorm",
    "fold_model",
    "layer_sensitivity",
    "measure_latency",
    "quantization_sensitivity",
    "quantize",
    "quantize_files",
]


callable_package(__name__, quantize)
