"""`QuantConfig`: what to quantize, how, and into which deployable artifacts.

Loads from a plain dict (a recipe step's TOML table) with `QuantConfig.from_dict`, which names unknown
or out-of-range fields before any work starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from export.parity import INT8_MIN_AGREEMENT, INT8_MIN_COSINE
from pocketfleet.config import config_from_dict

from .errors import QuantizeError

MODES = ("static", "dynamic", "fp16", "qat")
METHODS = ("minmax", "percentile", "entropy", "mse")
FORMATS = ("onnx", "tflite")
FALLBACKS = ("float", "error")
QUANT_FORMATS = ("qdq", "qoperator")


@dataclass
class QuantConfig:
    """Quantization settings.

    mode: "static" (int8 weights per-channel symmetric + int8 activations from calibration; ONNX QDQ and
      full-integer TFLite), "dynamic" (int8 weights, activations quantized at run time; ONNX
      DynamicQuantizeMatMul / TFLite dynamic-range), "fp16" (weights stored as float16), "qat" (fake-quant
      fine-tuning, then the static artifacts).
    formats: deployable artifacts to produce ("onnx", "tflite").
    calibration: activation range method for static/qat: "minmax", "percentile", "entropy" (KL), "mse".
    percentile: the percentile (of |x| mass kept) for calibration="percentile".
    calib_samples: rows drawn from the train split when no calibration data is passed.
    per_channel: per-output-channel weight scales (else one scale per tensor).
    quant_format: static ONNX graph form: "qdq" (QuantizeLinear/DequantizeLinear pairs around float ops,
      which onnxruntime fuses at load) or "qoperator" (QLinearConv, QLinearMatMul... written out).
    per_token: dynamic ONNX: activations of linear layers get one int8 scale per token (row) instead of one
      per tensor; far closer to fp32 on transformers (outlier tokens no longer set everyone's scale).
    reduce_range: ONNX (static, and dynamic's uint8 activations): 7-bit weights so that onnxruntime's u8s8 kernels cannot overflow int16 on
      x86 CPUs without VNNI (measured: digits-mbnet drops 2.5 pt top-1 there with 8-bit weights); "auto"
      decides from this host's CPU flags.
    float_layers: layer names (module paths such as "layers.5.ffn_out", or fnmatch patterns) kept in float.
    max_drop: accuracy-aware mode: keep the fewest layers in float (chosen by per-layer sensitivity) so
      that the metric drops by at most this much vs fp32 on the `sensitivity_split` (metric units:
      0.005 = 0.5 pt of top-1, or 0.005 of cosine).
    sensitivity_split / sensitivity_samples: data the sensitivity table and max_drop are judged on
      (0 = the whole split).
    fallback: "float" lets ops a target cannot run in int8 stay float (listed in float_layers); "error"
      raises UnsupportedOpError naming the first such op.
    smooth_alpha: dynamic ONNX: SmoothQuant migration strength for linear layers (None = off; "auto" picks
      per layer from calibration data).
    qat_epochs, qat_lr, qat_batch_size: fake-quant fine-tuning (mode "qat").
    eval_batch_size: batch size the artifacts' metric is measured with; 1 is how a device calls the model,
      and it matters: dynamic quantization takes its activation range from the whole batch.
    parity_min_agreement / parity_min_cosine: int8 parity bounds against the fp32 model (top-1 agreement of
      classifier outputs, lowest per-row cosine of embeddings); a package is written only within them.
    threads: intra-op threads for calibration, evaluation and latency runs.
    """

    mode: str = "static"
    formats: list[str] = field(default_factory=lambda: ["onnx", "tflite"])
    calibration: str = "mse"
    percentile: float = 99.99
    calib_samples: int = 256
    per_channel: bool = True
    quant_format: str = "qdq"
    per_token: bool = True
    reduce_range: bool | str = "auto"
    float_layers: list[str] = field(default_factory=list)
    max_drop: float | None = None
    sensitivity_split: str = "val"
    sensitivity_samples: int = 0
    fallback: str = "float"
    smooth_alpha: float | str | None = "auto"
    qat_epochs: int = 3
    qat_lr: float = 1e-4
    qat_batch_size: int = 64
    eval_batch_size: int = 1
    parity_min_agreement: float = INT8_MIN_AGREEMENT
    parity_min_cosine: float = INT8_MIN_COSINE
    threads: int = 1

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> QuantConfig:
        return config_from_dict(cls, data, "quantize", QuantizeError)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> QuantConfig:
        _choice(self.mode, MODES, "mode")
        _choice(self.calibration, METHODS, "calibration")
        _choice(self.fallback, FALLBACKS, "fallback")
        _choice(self.quant_format, QUANT_FORMATS, "quant_format")
        if isinstance(self.formats, str):
            self.formats = [self.formats]
        if not isinstance(self.formats, (list, tuple)) or not self.formats:
            raise QuantizeError(
                f"quantize.formats must be a non-empty list of {list(FORMATS)}, got {self.formats!r}"
            )
        for fmt in self.formats:
            _choice(fmt, FORMATS, "formats")
        self.formats = list(dict.fromkeys(self.formats))
        _number(self.percentile, "percentile", 50.0, 100.0)
        _integer(self.calib_samples, "calib_samples", 1)
        _integer(self.sensitivity_samples, "sensitivity_samples", 0)
        _integer(self.qat_epochs, "qat_epochs", 0)
        _integer(self.qat_batch_size, "qat_batch_size", 1)
        _integer(self.threads, "threads", 1)
        _integer(self.eval_batch_size, "eval_batch_size", 1)
        _number(self.qat_lr, "qat_lr", 0.0, 1.0)
        _number(self.parity_min_agreement, "parity_min_agreement", 0.0, 1.0)
        _number(self.parity_min_cosine, "parity_min_cosine", -1.0, 1.0)
        if self.max_drop is not None:
            _number(self.max_drop, "max_drop", 0.0, 1.0)
        if self.reduce_range != "auto" and not isinstance(self.reduce_range, bool):
            raise QuantizeError(
                f"quantize.reduce_range must be true, false or 'auto', got {self.reduce_range!r}"
            )
        for name in ("per_channel", "per_token"):
            if not isinstance(getattr(self, name), bool):
                raise QuantizeError(f"quantize.{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.float_layers, (list, tuple)) or not all(
            isinstance(x, str) for x in self.float_layers
        ):
            raise QuantizeError(
                f"quantize.float_layers must be a list of layer names, got {self.float_layers!r}"
            )
        self.float_layers = list(self.float_layers)
        if self.sensitivity_split not in ("train", "val", "test"):
            raise QuantizeError(
                f"quantize.sensitivity_split must be 'train', 'val' or 'test', got {self.sensitivity_split!r}"
            )
        if self.smooth_alpha is not None and self.smooth_alpha != "auto":
            _number(self.smooth_alpha, "smooth_alpha", 0.0, 1.0)
        return self


def _choice(value: Any, allowed: tuple[str, ...], name: str) -> None:
    if value not in allowed:
        raise QuantizeError(f"quantize.{name} must be one of {list(allowed)}, got {value!r}")


def _number(value: Any, name: str, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
        raise QuantizeError(f"quantize.{name} must be a number in [{lo:g}, {hi:g}], got {value!r}")


def _integer(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise QuantizeError(f"quantize.{name} must be an integer >= {minimum}, got {value!r}")
